//! `[auth] auth_user` and `auth_query`: the password of a user who is not in `[[users]]`
//! is looked up on the server, in the database the client asked for (or
//! `auth_dbname`), and reused for `auth_query_cache_secs`.
//!
//! The lookup runs on the proxy's own connections as `auth_user`, never on a client's,
//! and those connections start with `search_path` pinned to `pg_catalog, pg_temp`: no
//! client parameter, role or database setting can put an object of its own in front of
//! the catalog (CVE-2025-12819).

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use hashbrown::HashMap;

use crate::auth::{Secret, ServerCredential};
use crate::backend::{BackendConn, ConnectSpec, Rows};
use crate::codec::frontend;
use crate::codec::tag::status;
use crate::context::ShardCtx;
use crate::nodeaddr::NodeAddr;

/// What the server holds for one role.
#[derive(Clone, Debug)]
pub enum Found {
    /// No such role (or it may not log in).
    NoRole,
    /// The role and its stored password (`None`: it has none the proxy can check).
    Role {
        secret: Option<Secret>,
        /// `VALID UNTIL`, as seconds since the epoch.
        valid_until: Option<f64>,
    },
}

impl Found {
    /// Has the role's password expired at `now`?
    pub fn expired(&self, now: SystemTime) -> bool {
        let Found::Role {
            valid_until: Some(until),
            ..
        } = self
        else {
            return false;
        };
        let now = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        *until <= now
    }
}

/// Why a lookup gave no answer (logged; the client hears only that it failed).
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("no node can take the lookup")]
    NoNode,
    #[error("{0}")]
    Backend(#[from] crate::backend::BackendError),
    #[error("the query failed: {0}")]
    Query(String),
    #[error("the query must return (name, password[, valid_until]); it returned {0} column(s)")]
    Shape(usize),
    #[error("valid_until must be epoch seconds, not {0:?}")]
    ValidUntil(String),
    #[error("no answer within {0:?} (timeouts.server_login_timeout_ms)")]
    TimedOut(Duration),
}

/// Lookups a shard runs at once, so also its most lookup connections: a burst of logins
/// queues here rather than opening a server connection each.
const MAX_CONNECTIONS: usize = 4;

/// A shard's lookups: the cache and the idle connections of `auth_user`.
pub struct AuthQuery {
    cache: RefCell<HashMap<(String, String), (Found, Instant)>>,
    idle: RefCell<Vec<Idle>>,
    running: glommio::sync::Semaphore,
}

impl Default for AuthQuery {
    fn default() -> Self {
        AuthQuery {
            cache: RefCell::default(),
            idle: RefCell::default(),
            running: glommio::sync::Semaphore::new(MAX_CONNECTIONS as u64),
        }
    }
}

struct Idle {
    addr: NodeAddr,
    database: String,
    conn: BackendConn,
}

/// Entries the cache holds at most; past it, expired ones go (then all).
const MAX_CACHED: usize = 65_536;

impl AuthQuery {
    /// What the server holds for `user`, looked up in `database` (or `auth_dbname`), from
    /// the cache when fresh enough. `None` when `auth_query` is off.
    pub async fn lookup(
        &self,
        ctx: &ShardCtx,
        database: &str,
        user: &str,
    ) -> Option<Result<Found, LookupError>> {
        let config = ctx.config();
        let auth = &config.auth;
        let query = auth.query()?;
        let database = auth.auth_dbname.as_deref().unwrap_or(database);
        let key = (database.to_string(), user.to_string());
        let ttl = Duration::from_secs(auth.auth_query_cache_secs);
        if let Some(found) = self.cached(&key, ttl) {
            ctx.stats.auth_query_hits.inc();
            return Some(Ok(found));
        }
        let Ok(_permit) = self.running.acquire_permit(1).await else {
            return Some(Err(LookupError::NoNode));
        };
        // Logins of the same user that queued behind this one find its answer.
        if let Some(found) = self.cached(&key, ttl) {
            ctx.stats.auth_query_hits.inc();
            return Some(Ok(found));
        }
        // Bounded like a server login: a node that stopped answering must not hold
        // logins (it is soon declared down and another one asked).
        let limit = Duration::from_millis(config.timeouts.server_login_timeout_ms);
        let result = crate::sync::timeout(limit, self.fetch(ctx, database, query, user))
            .await
            .unwrap_or(Err(LookupError::TimedOut(limit)));
        match &result {
            Ok(found) => {
                ctx.stats.auth_query_lookups.inc();
                if !ttl.is_zero() {
                    self.remember(key, found.clone(), ttl);
                }
            }
            Err(_) => ctx.stats.auth_query_errors.inc(),
        }
        Some(result)
    }

    /// Drops what is cached for `user` (after a failed login, so the next attempt sees a
    /// password changed on the server).
    pub fn forget(&self, ctx: &ShardCtx, database: &str, user: &str) {
        let config = ctx.config();
        let database = config.auth.auth_dbname.as_deref().unwrap_or(database);
        self.cache
            .borrow_mut()
            .remove(&(database.to_string(), user.to_string()));
    }

    /// Empties the cache and closes idle connections (a reload may have changed the
    /// query, the role or its password).
    pub fn reset(&self) {
        self.cache.borrow_mut().clear();
        self.idle.borrow_mut().clear();
    }

    fn cached(&self, key: &(String, String), ttl: Duration) -> Option<Found> {
        let cache = self.cache.borrow();
        let (found, at) = cache.get(key)?;
        (at.elapsed() < ttl).then(|| found.clone())
    }

    fn remember(&self, key: (String, String), found: Found, ttl: Duration) {
        let mut cache = self.cache.borrow_mut();
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, (_, at)| at.elapsed() < ttl);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(key, (found, Instant::now()));
    }

    async fn fetch(
        &self,
        ctx: &ShardCtx,
        database: &str,
        query: &str,
        user: &str,
    ) -> Result<Found, LookupError> {
        let (addr, address) = lookup_node(ctx).ok_or(LookupError::NoNode)?;
        let mut conn = match self.take_idle(&addr, database) {
            Some(conn) => conn,
            None => connect(ctx, addr.clone(), &address, database).await?,
        };
        let mut request = Vec::with_capacity(128 + query.len() + user.len());
        frontend::encode_parse(&mut request, "", query, &[]);
        frontend::encode_bind_text(&mut request, "", "", &[Some(user.as_bytes())]);
        frontend::encode_execute(&mut request, "", 1);
        frontend::encode_sync(&mut request);
        let mut buf = vec![0u8; 8192];
        let (rows, error) = conn.fetch(&request, 1, &mut buf).await?;
        if conn.status == status::IDLE && conn.notifications.is_empty() {
            self.keep_idle(addr, database, conn);
        }
        if let Some(error) = error {
            return Err(LookupError::Query(format!(
                "{} {}",
                error.code(),
                error.message()
            )));
        }
        parse_rows(rows)
    }

    fn take_idle(&self, addr: &NodeAddr, database: &str) -> Option<BackendConn> {
        let mut idle = self.idle.borrow_mut();
        // Those to another node (a primary since replaced) are of no more use.
        idle.retain(|c| c.addr == *addr);
        while let Some(i) = idle
            .iter()
            .position(|c| c.addr == *addr && c.database == database)
        {
            let found = idle.swap_remove(i);
            if found.conn.is_alive() {
                return Some(found.conn);
            }
        }
        None
    }

    fn keep_idle(&self, addr: NodeAddr, database: &str, conn: BackendConn) {
        let mut idle = self.idle.borrow_mut();
        if idle.len() < MAX_CONNECTIONS {
            idle.push(Idle {
                addr,
                database: database.to_string(),
                conn,
            });
        }
    }
}

/// The primary when it may take work, else any node that may: every node holds the
/// same roles, and logins should not stop while a primary is replaced.
fn lookup_node(ctx: &ShardCtx) -> Option<(NodeAddr, Rc<str>)> {
    let nodes = ctx.nodes.borrow();
    let primary = crate::topology::primary_of(&nodes).filter(|n| n.routable());
    primary
        .or_else(|| nodes.iter().find(|n| n.routable()))
        .map(|n| (n.addr.clone(), n.address.clone()))
}

/// Startup parameters of a lookup connection: the catalog first, temporary objects
/// last, nothing else on the path.
const LOOKUP_PARAMS: [(&str, &str); 2] = [
    ("search_path", "pg_catalog, pg_temp"),
    ("application_name", "heliosdb-proxy auth_query"),
];

async fn connect(
    ctx: &ShardCtx,
    addr: NodeAddr,
    address: &str,
    database: &str,
) -> Result<BackendConn, LookupError> {
    let config = ctx.config();
    let auth_user = config.auth.auth_user.clone().unwrap_or_default();
    let password = config.auth.auth_password.clone().or_else(|| {
        config
            .users
            .iter()
            .find(|u| u.name == auth_user)
            .and_then(|u| u.backend_password().map(str::to_string))
    });
    let spec = ConnectSpec {
        addr,
        user: auth_user,
        database: database.to_string(),
        credential: password.map(ServerCredential::Password),
        startup_params: LOOKUP_PARAMS.to_vec(),
        connect_timeout: Duration::from_millis(config.timeouts.connect_timeout_ms),
        login_timeout: Duration::from_millis(config.timeouts.server_login_timeout_ms),
        max_message_size: config.limits.max_message_size,
        scram_cache: Rc::default(),
        tls: ctx.server_tls_for(address),
    };
    Ok(BackendConn::connect(&spec, 0).await?)
}

/// The first row: (name, password[, valid_until]); no row means no such role.
fn parse_rows(rows: Rows) -> Result<Found, LookupError> {
    let Some(row) = rows.into_iter().next() else {
        return Ok(Found::NoRole);
    };
    if !(2..=3).contains(&row.len()) {
        return Err(LookupError::Shape(row.len()));
    }
    let mut values = row.into_iter().skip(1);
    let password = values.next().flatten();
    let valid_until = match values.next().flatten() {
        None => None,
        Some(text) => Some(parse_epoch(&text).ok_or(LookupError::ValidUntil(text))?),
    };
    let secret = match password.as_deref().map(Secret::parse) {
        Some(Ok(secret)) => Some(secret),
        Some(Err(problem)) => {
            log::warn!("auth_query returned a password the proxy cannot use: {problem}");
            None
        }
        None => None,
    };
    Ok(Found::Role {
        secret,
        valid_until,
    })
}

/// Epoch seconds as PostgreSQL prints a double: digits, or `Infinity`/`-Infinity`.
fn parse_epoch(text: &str) -> Option<f64> {
    match text {
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => text.parse::<f64>().ok().filter(|v| v.is_finite()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(values: &[Option<&str>]) -> Rows {
        vec![values.iter().map(|v| v.map(str::to_string)).collect()]
    }

    #[test]
    fn rows_become_what_the_server_holds() {
        assert!(matches!(parse_rows(Vec::new()), Ok(Found::NoRole)));
        let found = parse_rows(row(&[
            Some("alice"),
            Some("md53175bce1d3201d16594cebf9d7eb3f9d"),
        ]));
        assert!(matches!(
            found,
            Ok(Found::Role {
                secret: Some(Secret::Md5(_)),
                valid_until: None
            })
        ));
        let found = parse_rows(row(&[Some("bob"), None, None])).unwrap();
        assert!(matches!(
            found,
            Found::Role {
                secret: None,
                valid_until: None
            }
        ));
        assert!(matches!(
            parse_rows(row(&[Some("x")])),
            Err(LookupError::Shape(1))
        ));
        assert!(matches!(
            parse_rows(row(&[Some("x"), Some("pw"), Some("tomorrow")])),
            Err(LookupError::ValidUntil(_))
        ));
    }

    #[test]
    fn valid_until_is_honoured() {
        let at = |text: &str| parse_rows(row(&[Some("carol"), Some("pw"), Some(text)])).unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert!(at("1799999999.5").expired(now));
        assert!(!at("1800000001").expired(now));
        assert!(!at("Infinity").expired(now));
        assert!(at("-Infinity").expired(now));
        assert!(!Found::NoRole.expired(now));
    }
}
