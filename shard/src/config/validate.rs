//! Validation rules that types alone cannot express. Each rule names the key it is about,
//! so the first error tells the operator exactly what to change.

use std::net::SocketAddr;

use super::{AuthMethod, Config, ConfigError, DatabaseConfig, NodeConfig, NodeRole, UserConfig};
use super::{LimitsConfig, PoolConfig, TimeoutsConfig};
use crate::auth::Secret;

/// Smallest and largest I/O buffer: below one page reads get too small to batch, above
/// 1 MiB every idle connection pins memory for nothing.
const MIN_BUFFER_SIZE: usize = 4096;
const MAX_BUFFER_SIZE: usize = 1024 * 1024;

/// Smaller than this and ordinary startup packets and queries no longer fit.
const MIN_MESSAGE_SIZE: usize = 1024;

type Check = Result<(), ConfigError>;

pub(super) fn config(config: &Config) -> Check {
    addresses(config)?;
    pool(&config.pool_mode)?;
    users(&config.users, config.auth.method)?;
    databases(&config.databases)?;
    nodes(&config.nodes)?;
    limits(&config.limits)?;
    timeouts(&config.timeouts)?;
    health(&config.health)?;
    routing(config)?;
    admin(config)?;
    admin_api(&config.admin_api)?;
    tls(&config.tls)?;
    unix_tls(config)?;
    cert_logins(config)?;
    auth_query(&config.auth)?;
    failover(&config.failover)?;
    cache(&config.cache)?;
    hba(&config.auth)
}

fn cache(c: &super::CacheConfig) -> Check {
    ensure(
        (1..=1024 * 1024).contains(&c.max_memory_mb),
        "cache.max_memory_mb",
        || "must be between 1 and 1048576".into(),
    )?;
    ensure(
        c.max_result_bytes >= 64 && c.max_result_bytes <= c.max_memory_mb * 1024 * 1024,
        "cache.max_result_bytes",
        || "must be at least 64 and at most cache.max_memory_mb".into(),
    )?;
    ensure(
        c.default_ttl_secs <= 365 * 24 * 3600,
        "cache.default_ttl_secs",
        || "must be at most one year (31536000)".into(),
    )?;
    for (i, table) in c.tables.iter().enumerate() {
        let parts: Vec<&str> = table.name.split('.').collect();
        ensure(
            !table.name.is_empty() && parts.len() <= 2 && parts.iter().all(|p| !p.is_empty()),
            &format!("cache.tables[{i}].name"),
            || format!("{:?} is not `table` or `schema.table`", table.name),
        )?;
        ensure(
            table.ttl_secs.is_none_or(|t| t <= 365 * 24 * 3600),
            &format!("cache.tables[{i}].ttl_secs"),
            || "must be at most one year (31536000)".into(),
        )?;
    }
    Ok(())
}

fn failover(f: &super::FailoverConfig) -> Check {
    ensure(
        f.write_timeout_secs.is_finite()
            && f.write_timeout_secs > 0.0
            && f.write_timeout_secs <= 3600.0,
        "failover.write_timeout_secs",
        || "must be more than 0 and at most 3600".into(),
    )?;
    ensure(f.buffer_max > 0, "failover.buffer_max", || {
        "must be at least 1".into()
    })?;
    ensure(
        (10..=60_000).contains(&f.fast_probe_ms),
        "failover.fast_probe_ms",
        || "must be between 10 and 60000".into(),
    )?;
    ensure(
        f.promote_timeout_secs > 0,
        "failover.promote_timeout_secs",
        || "must be at least 1".into(),
    )?;
    ensure(
        f.switchover_drain_secs.is_finite()
            && f.switchover_drain_secs >= 0.0
            && f.switchover_drain_secs <= 3600.0,
        "failover.switchover_drain_secs",
        || "must be between 0 and 3600".into(),
    )?;
    ensure(
        (1024..=256 * 1024 * 1024).contains(&f.replay_journal_max_bytes),
        "failover.replay_journal_max_bytes",
        || "must be between 1024 and 268435456".into(),
    )?;
    ensure(
        !f.track_commit_outcome || f.replay,
        "failover.track_commit_outcome",
        || "takes effect only with failover.replay = true".into(),
    )?;
    if let Some(user) = &f.user {
        ensure(!user.is_empty(), "failover.user", || {
            "must name a role (or be left out to use the health checks' role)".into()
        })?;
    }
    ensure(
        f.password.is_none() || f.user.is_some(),
        "failover.password",
        || "takes effect only with failover.user".into(),
    )
}

/// `auth_query` and its companions need `auth_user`; the query takes the name as `$1`.
fn auth_query(auth: &super::AuthConfig) -> Check {
    let needs_user = [
        ("auth.auth_password", auth.auth_password.is_some()),
        ("auth.auth_query", auth.auth_query.is_some()),
        ("auth.auth_dbname", auth.auth_dbname.is_some()),
    ];
    for (key, set) in needs_user {
        ensure(!set || auth.auth_user.is_some(), key, || {
            "takes effect only with auth.auth_user, which turns auth_query on".into()
        })?;
    }
    if let Some(user) = &auth.auth_user {
        ensure(!user.is_empty(), "auth.auth_user", || {
            "must name a role (or be left out to turn auth_query off)".into()
        })?;
    }
    if let Some(query) = &auth.auth_query {
        ensure(query.contains("$1"), "auth.auth_query", || {
            "must take the user name as $1 and return (name, password[, valid_until])".into()
        })?;
    }
    if let Some(database) = &auth.auth_dbname {
        ensure(!database.is_empty(), "auth.auth_dbname", || {
            "must name a database (or be left out to use the client's)".into()
        })?;
    }
    Ok(())
}

/// The rules file must read and parse; the error names its line.
fn hba(auth: &super::AuthConfig) -> Check {
    crate::auth::hba::load(auth)
        .map(drop)
        .map_err(|problem| ConfigError::new("auth.auth_hba_file", problem))
}

/// Certificate logins need certificates that were checked against a CA.
fn cert_logins(config: &Config) -> Check {
    let method = config.auth.method;
    let cert_users = config
        .users
        .iter()
        .enumerate()
        .filter(|(_, u)| u.method(method) == AuthMethod::Cert);
    for (index, user) in cert_users {
        let key = if user.auth_method.is_some() {
            format!("users[{index}].auth_method")
        } else {
            "auth.method".to_string()
        };
        ensure(config.tls.client_ca_file.is_some(), &key, || {
            format!(
                "user `{}` logs in with cert, which needs tls.client_ca_file (and client_sslmode other than disable) to verify client certificates",
                user.name
            )
        })?;
        ensure(
            config.tls.client_sslmode != super::SslMode::Disable,
            &key,
            || {
                format!("user `{}` logs in with cert, which needs tls.client_sslmode other than disable", user.name)
            },
        )?;
    }
    Ok(())
}

/// The certificates and keys must load: a TLS setup that cannot start is refused with
/// the key to fix, not found out at the first client.
fn tls(tls: &super::TlsConfig) -> Check {
    let refuse = |e: crate::tls::TlsError| ConfigError::new(e.key, e.message);
    crate::tls::client_acceptor(tls).map_err(refuse)?;
    crate::tls::server_connector(tls).map_err(refuse)?;
    Ok(())
}

fn routing(config: &Config) -> Check {
    let lag = config.routing.lag_check_interval_secs;
    ensure(
        lag.is_finite() && (0.05..=86_400.0).contains(&lag),
        "routing.lag_check_interval_secs",
        || "must be between 0.05 and 86400".into(),
    )?;
    for (index, name) in config.load_balancer.read_only_functions.iter().enumerate() {
        ensure(
            !name.trim().is_empty() && !name.contains(['(', ')', ' ']),
            &format!("load_balancer.read_only_functions[{index}]"),
            || "must be a function name (`name` or `schema.name`)".into(),
        )?;
    }
    for (index, route) in config.schema_routes.iter().enumerate() {
        ensure(
            !route.tables.is_empty(),
            &format!("schema_routes[{index}].tables"),
            || "must name at least one table".into(),
        )?;
        for (t, table) in route.tables.iter().enumerate() {
            ensure(
                !table.trim().is_empty() && table.split('.').count() <= 2,
                &format!("schema_routes[{index}].tables[{t}]"),
                || "must be `table` or `schema.table`".into(),
            )?;
        }
        let target = route.target.as_str();
        let known = matches!(target, "primary" | "standby" | "replica")
            || config
                .nodes
                .iter()
                .any(|n| n.label() == target || n.address() == target);
        ensure(known, &format!("schema_routes[{index}].target"), || {
            format!(
                "`{target}` is neither primary, standby, replica nor the name or address of a [[nodes]] entry"
            )
        })?;
    }
    Ok(())
}

fn health(health: &super::HealthConfig) -> Check {
    ensure(
        health.check_interval_secs.is_finite() && health.check_interval_secs >= 0.05,
        "health.check_interval_secs",
        || "must be at least 0.05".into(),
    )?;
    ensure(
        health.check_interval_secs <= 86_400.0,
        "health.check_interval_secs",
        || "must be at most 86400 (one day)".into(),
    )?;
    positive(health.timeout_ms, "health.timeout_ms")?;
    positive(health.failure_threshold.into(), "health.failure_threshold")?;
    positive(health.success_threshold.into(), "health.success_threshold")?;
    ensure(!health.query.trim().is_empty(), "health.query", || {
        "must not be empty".into()
    })?;
    ensure(!health.database.is_empty(), "health.database", || {
        "must not be empty".into()
    })?;
    if let Some(user) = &health.user {
        ensure(!user.is_empty(), "health.user", || {
            "must not be empty".into()
        })?;
    }
    Ok(())
}

fn admin(config: &Config) -> Check {
    if let Some(token) = &config.admin_token {
        ensure(token.len() >= 8, "admin_token", || {
            "must be at least 8 characters (or left out to need no token)".into()
        })?;
        ensure(
            token.bytes().all(|b| b.is_ascii_graphic()),
            "admin_token",
            || "must be printable ASCII without spaces".into(),
        )?;
    }
    for (key, list) in [
        ("admin_users", &config.admin_users),
        ("stats_users", &config.stats_users),
    ] {
        for (index, name) in list.iter().enumerate() {
            ensure(
                config.users.iter().any(|u| &u.name == name),
                &format!("{key}[{index}]"),
                || format!("`{name}` is not a configured [[users]] name"),
            )?;
        }
    }
    Ok(())
}

/// glommio's blocking pool takes at most 4096 queued calls; the admin API stays below.
const MAX_ADMIN_IN_FLIGHT: usize = 4096;
/// Longest admin API timeout: an hour is already far past any probe or scrape.
const MAX_ADMIN_TIMEOUT_MS: u64 = 3_600_000;

fn admin_api(api: &super::AdminApiConfig) -> Check {
    ensure((1..=64).contains(&api.workers), "admin_api.workers", || {
        "must be between 1 and 64".into()
    })?;
    ensure(
        (1..=MAX_ADMIN_IN_FLIGHT - api.workers).contains(&api.queue_depth),
        "admin_api.queue_depth",
        || {
            format!(
                "must be between 1 and {} (workers + queue_depth at most {MAX_ADMIN_IN_FLIGHT})",
                MAX_ADMIN_IN_FLIGHT - api.workers
            )
        },
    )?;
    ensure(
        (1..=1_000_000).contains(&api.max_connections),
        "admin_api.max_connections",
        || "must be between 1 and 1000000".into(),
    )?;
    for (value, key) in [
        (api.read_timeout_ms, "admin_api.read_timeout_ms"),
        (api.idle_timeout_ms, "admin_api.idle_timeout_ms"),
        (api.queue_timeout_ms, "admin_api.queue_timeout_ms"),
    ] {
        ensure((1..=MAX_ADMIN_TIMEOUT_MS).contains(&value), key, || {
            format!("must be between 1 and {MAX_ADMIN_TIMEOUT_MS} (one hour)")
        })?;
    }
    Ok(())
}

fn ensure(condition: bool, key: &str, problem: impl FnOnce() -> String) -> Check {
    if condition {
        Ok(())
    } else {
        Err(ConfigError::new(key, problem()))
    }
}

fn positive(value: u64, key: &str) -> Check {
    ensure(value > 0, key, || "must be greater than 0".into())
}

fn addresses(config: &Config) -> Check {
    let listen = socket_address(&config.listen_address, "listen_address")?;
    let admin = socket_address(&config.admin_address, "admin_address")?;
    ensure(listen != admin, "admin_address", || {
        "must differ from listen_address".into()
    })
}

fn databases(databases: &[DatabaseConfig]) -> Check {
    for (index, db) in databases.iter().enumerate() {
        let key = format!("databases[{index}].name");
        ensure(!db.name.is_empty(), &key, || "must not be empty".into())?;
        if let Some(first) = databases[..index].iter().position(|d| d.name == db.name) {
            return Err(ConfigError::new(
                key,
                format!(
                    "database `{}` is already defined by databases[{first}]",
                    db.name
                ),
            ));
        }
    }
    Ok(())
}

fn socket_address(value: &str, key: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        ConfigError::new(
            key,
            format!("`{value}` is not an IP socket address such as 127.0.0.1:6432 or [::1]:6432"),
        )
    })
}

fn pool(pool: &PoolConfig) -> Check {
    ensure(pool.max_pool_size >= 1, "pool_mode.max_pool_size", || {
        "must be at least 1".into()
    })?;
    ensure(
        pool.min_idle <= pool.max_pool_size,
        "pool_mode.min_idle",
        || {
            format!(
                "must not exceed pool_mode.max_pool_size ({})",
                pool.max_pool_size
            )
        },
    )?;
    positive(pool.idle_timeout_secs, "pool_mode.idle_timeout_secs")?;
    positive(pool.max_lifetime_secs, "pool_mode.max_lifetime_secs")?;
    positive(pool.acquire_timeout_ms, "pool_mode.acquire_timeout_ms")?;
    ensure(
        pool.max_prepared_statements >= 1,
        "pool_mode.max_prepared_statements",
        || "must be at least 1".into(),
    )
}

fn users(users: &[UserConfig], default_method: AuthMethod) -> Check {
    for (index, user) in users.iter().enumerate() {
        let key = |field: &str| format!("users[{index}].{field}");
        ensure(!user.name.is_empty(), &key("name"), || {
            "must not be empty".into()
        })?;
        if let Some(first) = users[..index].iter().position(|u| u.name == user.name) {
            return Err(ConfigError::new(
                key("name"),
                format!("user `{}` is already defined by users[{first}]", user.name),
            ));
        }
        user_password(user, user.method(default_method), &key("password"))?;
        user_backend_login(user, &key)?;
    }
    Ok(())
}

/// The password must parse and must be able to check the user's login method.
fn user_password(user: &UserConfig, method: AuthMethod, key: &str) -> Check {
    let Some(password) = user.password.as_deref() else {
        return ensure(
            matches!(method, AuthMethod::Trust | AuthMethod::Cert),
            key,
            || format!("required: user `{}` logs in with {method}", user.name),
        );
    };
    let secret = Secret::parse(password).map_err(|problem| ConfigError::new(key, problem))?;
    match (method, &secret) {
        (AuthMethod::Md5, Secret::Scram(_)) => Err(ConfigError::new(
            key,
            "a SCRAM verifier cannot check md5 logins: use a plain password or an md5 hash",
        )),
        (AuthMethod::ScramSha256, Secret::Md5(_)) => Err(ConfigError::new(
            key,
            "an md5 hash cannot check scram-sha-256 logins: use a plain password or a SCRAM verifier",
        )),
        _ => Ok(()),
    }
}

/// `server_user` and `server_password` are sent to backends as they are.
fn user_backend_login(user: &UserConfig, key: &dyn Fn(&str) -> String) -> Check {
    if let Some(server_user) = &user.server_user {
        ensure(!server_user.is_empty(), &key("server_user"), || {
            "must not be empty when set".into()
        })?;
    }
    if let Some(server_password) = &user.server_password {
        let plain = matches!(Secret::parse(server_password), Ok(Secret::Plain(_)));
        ensure(plain, &key("server_password"), || {
            "must be the plain-text password the backend expects (not empty, not a hash)".into()
        })?;
    }
    Ok(())
}

fn nodes(nodes: &[NodeConfig]) -> Check {
    ensure(!nodes.is_empty(), "nodes", || {
        "at least one [[nodes]] entry is required".into()
    })?;
    for (index, node) in nodes.iter().enumerate() {
        let key = |field: &str| format!("nodes[{index}].{field}");
        ensure(!node.host.trim().is_empty(), &key("host"), || {
            "must not be empty".into()
        })?;
        ensure(node.port > 0, &key("port"), || {
            "must be greater than 0".into()
        })?;
        if node.is_unix() {
            let path = node.address();
            ensure(
                path.len() <= crate::nodeaddr::MAX_SOCKET_PATH,
                &key("host"),
                || {
                    format!(
                        "the socket path `{path}` is longer than the {} bytes a Unix-domain socket address holds",
                        crate::nodeaddr::MAX_SOCKET_PATH
                    )
                },
            )?;
        } else {
            ensure(!node.host.contains('/'), &key("host"), || {
                format!(
                    "`{}` is neither a host name nor an IP address; a Unix-socket directory must be an absolute path (starting with /)",
                    node.host
                )
            })?;
        }
        if let Some(name) = &node.name {
            ensure(!name.is_empty(), &key("name"), || {
                "must not be empty when set".into()
            })?;
        }
    }
    single_primary(nodes)
}

/// TLS is never used over a Unix-domain socket (as with libpq), so a `server_sslmode`
/// that requires it cannot be met by a node reached that way.
fn unix_tls(config: &Config) -> Check {
    if config.tls.server_sslmode < super::SslMode::Require {
        return Ok(());
    }
    match config.nodes.iter().position(NodeConfig::is_unix) {
        Some(index) => Err(ConfigError::new(
            "tls.server_sslmode",
            format!(
                "requires TLS, which is not used over a Unix-domain socket, and nodes[{index}] (`{}`) is reached over one: use prefer, allow or disable, or give that node a TCP host",
                config.nodes[index].address()
            ),
        )),
        None => Ok(()),
    }
}

/// Writes need exactly one place to go.
fn single_primary(nodes: &[NodeConfig]) -> Check {
    let mut primaries = nodes
        .iter()
        .enumerate()
        .filter(|(_, node)| node.enabled && node.role == NodeRole::Primary)
        .map(|(index, _)| index);
    let Some(first) = primaries.next() else {
        return Err(ConfigError::new(
            "nodes",
            "no enabled node has role = \"primary\"; exactly one is required",
        ));
    };
    match primaries.next() {
        Some(second) => Err(ConfigError::new(
            format!("nodes[{second}].role"),
            format!("nodes[{first}] is already the enabled primary; only one is allowed"),
        )),
        None => Ok(()),
    }
}

fn limits(limits: &LimitsConfig) -> Check {
    ensure(
        (MIN_BUFFER_SIZE..=MAX_BUFFER_SIZE).contains(&limits.buffer_size),
        "limits.buffer_size",
        || format!("must be between {MIN_BUFFER_SIZE} and {MAX_BUFFER_SIZE} bytes"),
    )?;
    ensure(
        limits.max_message_size >= MIN_MESSAGE_SIZE,
        "limits.max_message_size",
        || format!("must be at least {MIN_MESSAGE_SIZE} bytes"),
    )?;
    ensure(
        limits.max_client_connections >= 1,
        "limits.max_client_connections",
        || "must be at least 1".into(),
    )?;
    ensure(
        limits.buffered_message_size >= MIN_MESSAGE_SIZE,
        "limits.buffered_message_size",
        || format!("must be at least {MIN_MESSAGE_SIZE} bytes"),
    )?;
    ensure(
        limits.message_memory >= limits.buffered_message_size.min(limits.max_message_size),
        "limits.message_memory",
        || "must hold at least one buffered message (limits.buffered_message_size)".into(),
    )
}

fn timeouts(timeouts: &TimeoutsConfig) -> Check {
    positive(timeouts.connect_timeout_ms, "timeouts.connect_timeout_ms")?;
    positive(
        timeouts.server_login_timeout_ms,
        "timeouts.server_login_timeout_ms",
    )?;
    positive(timeouts.startup_timeout_ms, "timeouts.startup_timeout_ms")?;
    positive(
        timeouts.shutdown_timeout_secs,
        "timeouts.shutdown_timeout_secs",
    )?;
    positive(
        timeouts.dirty_release_timeout_ms,
        "timeouts.dirty_release_timeout_ms",
    )?;
    positive(
        timeouts.client_stall_timeout_ms,
        "timeouts.client_stall_timeout_ms",
    )
}
