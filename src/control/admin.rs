//! The admin REST API on `admin_address`: health and readiness probes, node management,
//! configuration, metrics, sessions and pools. Every error is a JSON `{"error": "..."}`
//! with the matching status; mutating requests need the bearer token when `admin_token`
//! is set. The HTTP server that feeds it requests is [`super::http`].

use std::time::SystemTime;

use helios_shard::control::{Detail, PoolReport};
use serde_json::{json, Value};

use super::http::Request;
use super::{Control, ControlError, NodeStatus};

/// A handled request: status, JSON or text body.
pub struct Reply {
    pub status: u16,
    pub body: Body,
    pub headers: Vec<(&'static str, String)>,
}

pub enum Body {
    Json(Value),
    Text(String),
}

impl Reply {
    pub fn json(status: u16, value: Value) -> Reply {
        Reply {
            status,
            body: Body::Json(value),
            headers: Vec::new(),
        }
    }

    pub fn error(status: u16, message: impl Into<String>) -> Reply {
        Reply::json(status, json!({ "error": message.into() }))
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }
}

/// The decoded segments of `path`; `None` when a `%` escape is malformed.
fn segments(path: &str) -> Option<Vec<String>> {
    path.trim_end_matches('/')
        .split('/')
        .skip(1)
        .map(percent_decode)
        .collect()
}

/// True for the probes (`/health`, `/health/live`, `/health/ready`): they read only
/// in-memory state, so the server answers them on its I/O thread, never behind a queue.
pub fn is_probe(path: &str) -> bool {
    segments(path).is_some_and(|segments| {
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        matches!(
            route(&segments),
            Some(Route::Health | Route::Ready | Route::Live)
        )
    })
}

/// Routes one request.
pub fn handle(control: &Control, request: &Request) -> Reply {
    let path = request.path();
    let Some(segments) = segments(path) else {
        return Reply::error(400, "malformed percent-encoding in the path");
    };
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let route = match route(&segments) {
        Some(route) => route,
        None => return Reply::error(404, format!("no such endpoint: {path}")),
    };
    let allowed = if route.mutating() { "POST" } else { "GET" };
    let method = request.method.as_str();
    let method_ok = match route.mutating() {
        true => method == "POST",
        false => method == "GET" || method == "HEAD",
    };
    if !method_ok {
        return Reply::error(405, format!("{path} accepts {allowed} only"))
            .with_header("Allow", allowed);
    }
    if route.mutating() {
        if let Err(reply) = authorize(control, request) {
            return reply;
        }
        if let Err(reply) = check_body(&request.body) {
            return reply;
        }
    }
    dispatch(control, route, &request.body)
}

/// A string field of a JSON body (absent or null: `None`); an error names the field.
fn body_field(body: &[u8], field: &str) -> Result<Option<String>, Reply> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Reply::error(400, format!("malformed JSON body: {e}")))?;
    match value.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(_) => Err(Reply::error(
            400,
            format!("\"{field}\" must be a node address (\"host:port\")"),
        )),
    }
}

/// The endpoints.
enum Route<'a> {
    Health,
    Ready,
    Live,
    Nodes,
    Node(&'a str),
    NodeAction(&'a str, NodeAction),
    Config,
    Reload,
    Metrics,
    Prometheus,
    Sessions,
    Pools,
    Version,
    Topology,
    /// `POST /failover`: promote a standby now.
    Failover,
    /// `POST /switchover`: move the primary role without losing a write.
    Switchover,
    /// `POST /primary`: name the primary (manual provider).
    Primary,
    /// `GET /cache`: the result cache's counters.
    Cache,
    /// `POST /cache/invalidate`: drop results by table, or all of them.
    CacheInvalidate,
}

#[derive(Clone, Copy)]
enum NodeAction {
    Enable,
    Disable,
    Drain,
}

impl Route<'_> {
    fn mutating(&self) -> bool {
        matches!(
            self,
            Route::NodeAction(..)
                | Route::Reload
                | Route::Failover
                | Route::Switchover
                | Route::Primary
                | Route::CacheInvalidate
        )
    }
}

fn route<'a>(segments: &[&'a str]) -> Option<Route<'a>> {
    Some(match segments {
        ["health"] => Route::Health,
        ["health", "ready"] => Route::Ready,
        ["health", "live"] => Route::Live,
        ["nodes"] => Route::Nodes,
        ["nodes", address] => Route::Node(address),
        ["nodes", address, "enable"] => Route::NodeAction(address, NodeAction::Enable),
        ["nodes", address, "disable"] => Route::NodeAction(address, NodeAction::Disable),
        ["nodes", address, "drain"] => Route::NodeAction(address, NodeAction::Drain),
        ["config"] => Route::Config,
        ["config", "reload"] => Route::Reload,
        ["metrics"] => Route::Metrics,
        ["metrics", "prometheus"] => Route::Prometheus,
        ["sessions"] => Route::Sessions,
        ["pools"] => Route::Pools,
        ["version"] => Route::Version,
        ["topology"] => Route::Topology,
        ["failover"] => Route::Failover,
        ["switchover"] => Route::Switchover,
        ["primary"] => Route::Primary,
        ["cache"] => Route::Cache,
        ["cache", "invalidate"] => Route::CacheInvalidate,
        _ => return None,
    })
}

fn dispatch(control: &Control, route: Route<'_>, body: &[u8]) -> Reply {
    match route {
        Route::Topology => Reply::json(200, control.topology_json()),
        Route::Cache => Reply::json(200, super::cache::json(control)),
        Route::CacheInvalidate => match super::cache::parse_invalidate(body) {
            Ok(what) => Reply::json(200, super::cache::invalidate(control, what)),
            Err(message) => Reply::error(400, message),
        },
        Route::Failover => {
            let target = match body_field(body, "target") {
                Ok(target) => target,
                Err(reply) => return reply,
            };
            match control.failover(target.as_deref()) {
                Ok(topology) => Reply::json(200, topology),
                Err(e) => control_error(e),
            }
        }
        Route::Switchover => {
            let target = match body_field(body, "target") {
                Ok(target) => target,
                Err(reply) => return reply,
            };
            match control.switchover(target.as_deref()) {
                Ok(topology) => Reply::json(200, topology),
                Err(e) => control_error(e),
            }
        }
        Route::Primary => {
            let address = match body_field(body, "address") {
                Ok(Some(address)) => address,
                Ok(None) => {
                    return Reply::error(
                        400,
                        "the body must name the primary: {\"address\": \"host:port\"}",
                    )
                }
                Err(reply) => return reply,
            };
            match control.set_primary(&address) {
                Ok(topology) => Reply::json(200, topology),
                Err(e) => control_error(e),
            }
        }
        Route::Health => Reply::json(200, json!({ "status": "ok" })),
        Route::Live => Reply::json(200, json!({ "alive": true })),
        Route::Ready => {
            if control.ready() {
                Reply::json(200, json!({ "ready": true, "message": "Proxy is ready" }))
            } else {
                Reply::json(
                    503,
                    json!({ "ready": false, "message": "Proxy is not ready" }),
                )
            }
        }
        Route::Nodes => Reply::json(
            200,
            Value::Array(control.nodes().iter().map(node_json).collect()),
        ),
        Route::Node(address) => match control.node(address) {
            Some(node) => Reply::json(200, node_json(&node)),
            None => Reply::error(404, "Node not found"),
        },
        Route::NodeAction(address, action) => {
            let (result, status) = match action {
                NodeAction::Enable => (control.set_enabled(address, true), "enabled"),
                NodeAction::Disable => (control.set_enabled(address, false), "disabled"),
                NodeAction::Drain => (control.drain(address), "draining"),
            };
            match result {
                Ok(_) => Reply::json(200, json!({ "status": status })),
                Err(e) => control_error(e),
            }
        }
        Route::Config => Reply::json(200, config_json(control)),
        Route::Reload => match control.reload() {
            Ok(report) => Reply::json(
                200,
                json!({
                    "status": "reloaded",
                    "changed": report.changed,
                    "nodes_added": report.nodes_added,
                    "nodes_removed": report.nodes_removed,
                    "restart_required": report.restart_required,
                }),
            ),
            Err(e) => control_error(e),
        },
        Route::Metrics => Reply::json(200, super::metrics::json(control)),
        Route::Prometheus => Reply {
            status: 200,
            body: Body::Text(super::metrics::prometheus(control)),
            headers: Vec::new(),
        },
        Route::Sessions => {
            let active: u64 = control
                .shard_links()
                .iter()
                .map(|l| l.stats.clients_active())
                .sum();
            Reply::json(200, json!({ "active_sessions": active }))
        }
        Route::Pools => Reply::json(200, pools_json(control)),
        Route::Version => Reply::json(
            200,
            json!({
                "version": env!("CARGO_PKG_VERSION"),
                "build_time": build_time(),
                "commit": env!("HELIOS_GIT_COMMIT"),
            }),
        ),
    }
}

fn control_error(e: ControlError) -> Reply {
    match e {
        ControlError::NodeNotFound => Reply::error(404, e.to_string()),
        ControlError::InvalidConfig(_) => Reply::error(400, e.to_string()),
        ControlError::Conflict(_) => Reply::error(409, e.to_string()),
        ControlError::Failed(_) => Reply::error(500, e.to_string()),
    }
}

/// Mutating requests need `Authorization: Bearer <admin_token>` when a token is set.
fn authorize(control: &Control, request: &Request) -> Result<(), Reply> {
    let config = control.config();
    let Some(token) = config.admin_token.as_deref() else {
        return Ok(());
    };
    let given = request.header("Authorization");
    let Some(given) = given else {
        return Err(unauthorized(
            "this endpoint needs Authorization: Bearer <admin_token>",
        ));
    };
    let presented = given
        .strip_prefix("Bearer ")
        .or_else(|| given.strip_prefix("bearer "))
        .map(str::trim)
        .unwrap_or("");
    if constant_time_eq(presented.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(unauthorized("invalid admin token"))
    }
}

fn unauthorized(message: &str) -> Reply {
    Reply::error(401, message).with_header("WWW-Authenticate", "Bearer")
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// POST bodies are optional; one that is sent must be a JSON object (its size was
/// bounded by the server).
fn check_body(body: &[u8]) -> Result<(), Reply> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(_)) => Ok(()),
        Ok(_) => Err(Reply::error(400, "the request body must be a JSON object")),
        Err(e) => Err(Reply::error(400, format!("malformed JSON body: {e}"))),
    }
}

/// Decodes %XX escapes in one path segment; `None` when malformed or not UTF-8.
fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// When this binary was built (stamped by build.rs), in ISO 8601.
pub fn build_time() -> String {
    let secs = env!("HELIOS_BUILD_EPOCH").parse().unwrap_or(0);
    iso8601(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// RFC 3339 / ISO 8601 UTC with milliseconds, e.g. `2026-03-26T10:15:30.123Z`.
pub fn iso8601(t: SystemTime) -> String {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

pub fn role_name(role: helios_shard::config::NodeRole) -> &'static str {
    match role {
        helios_shard::config::NodeRole::Primary => "primary",
        helios_shard::config::NodeRole::Standby => "standby",
        helios_shard::config::NodeRole::Replica => "replica",
    }
}

fn node_json(node: &NodeStatus) -> Value {
    let h = &node.health;
    json!({
        "address": node.address,
        "name": node.label,
        "role": role_name(node.role),
        "weight": node.weight,
        "priority": node.priority,
        "enabled": node.enabled,
        "draining": node.draining,
        "healthy": h.healthy,
        "last_check": h.last_check.map(iso8601),
        "failure_count": h.failure_count,
        "last_error": h.last_error,
        "latency_ms": h.latency_ms,
        "replication_lag_bytes": h.replication_lag_bytes,
        "replication_lag_seconds": h.replication_lag_seconds,
        "in_recovery": h.in_recovery,
        "configured_role": role_name(node.configured_role),
        "fenced": node.fenced,
        "writable": super::failover::writable(node),
    })
}

/// The configuration with every secret replaced by `"<redacted>"`, plus the summary
/// fields the API reference lists.
fn config_json(control: &Control) -> Value {
    let config = control.config();
    let mut full = serde_json::to_value(&*config).unwrap_or(Value::Null);
    redact(&mut full);
    let nodes: Vec<Value> = control
        .nodes()
        .iter()
        .map(|n| {
            json!({
                "address": n.address,
                "role": role_name(n.role),
                "weight": n.weight,
                "enabled": n.enabled,
            })
        })
        .collect();
    json!({
        "listen_address": config.listen_address,
        "admin_address": config.admin_address,
        "pool_mode": format!("{:?}", config.pool_mode.mode).to_lowercase(),
        "pool_min_connections": config.pool_mode.min_idle,
        "pool_max_connections": config.pool_mode.max_pool_size,
        "nodes": nodes,
        "config": full,
    })
}

const SECRET_KEYS: [&str; 5] = [
    "password",
    "server_password",
    "auth_password",
    "admin_token",
    "token",
];

pub(crate) fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if SECRET_KEYS.contains(&key.as_str()) && !v.is_null() {
                    *v = Value::String("<redacted>".into());
                } else {
                    redact(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// Per node: the documented pool figures, summed over shards, databases and users, with
/// the node's state so a drain can be followed to the end.
fn pools_json(control: &Control) -> Value {
    let snapshots = control.gather(Detail::default());
    let pools: Vec<&PoolReport> = snapshots.iter().flat_map(|s| s.pools.iter()).collect();
    let nodes = control.nodes();
    let mut out = Vec::with_capacity(nodes.len());
    for node in &nodes {
        let mine: Vec<&&PoolReport> = pools.iter().filter(|p| p.node == node.address).collect();
        let active: usize = mine.iter().map(|p| p.active()).sum();
        let idle: usize = mine.iter().map(|p| p.idle).sum();
        let waiting: usize = mine.iter().map(|p| p.waiting).sum();
        let created: u64 = mine.iter().map(|p| p.created).sum();
        let closed: u64 = mine.iter().map(|p| p.closed).sum();
        let detail: Vec<Value> = mine
            .iter()
            .map(|p| {
                json!({
                    "database": p.database,
                    "user": p.user,
                    "active_connections": p.active(),
                    "idle_connections": p.idle,
                    "pending_requests": p.waiting,
                })
            })
            .collect();
        out.push(json!({
            "node": node.address,
            "active_connections": active,
            "idle_connections": idle,
            "pending_requests": waiting,
            "total_connections_created": created,
            "total_connections_closed": closed,
            "max_connections": control.config().pool_mode.max_pool_size,
            "enabled": node.enabled,
            "healthy": node.health.healthy,
            "draining": node.draining,
            "drained": node.draining && active == 0,
            "pools": detail,
        }));
    }
    Value::Array(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_matches_known_instants() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_774_520_130_123);
        assert_eq!(iso8601(t), "2026-03-26T10:15:30.123Z");
        assert_eq!(iso8601(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(iso8601(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("%5B%3A%3A1%5D%3A5432").as_deref(),
            Some("[::1]:5432")
        );
        assert_eq!(percent_decode("db:5432").as_deref(), Some("db:5432"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
    }

    #[test]
    fn secrets_are_redacted_at_any_depth() {
        let mut v = json!({
            "admin_token": "t0ken-secret",
            "users": [{"name": "a", "password": "x", "server_password": "y"}],
            "health": {"password": null, "user": "h"},
        });
        redact(&mut v);
        assert_eq!(v["admin_token"], "<redacted>");
        assert_eq!(v["users"][0]["password"], "<redacted>");
        assert_eq!(v["users"][0]["server_password"], "<redacted>");
        assert_eq!(v["users"][0]["name"], "a");
        assert!(v["health"]["password"].is_null());
    }

    #[test]
    fn routes() {
        assert!(matches!(route(&["health"]), Some(Route::Health)));
        assert!(matches!(
            route(&["nodes", "h:1", "drain"]),
            Some(Route::NodeAction("h:1", NodeAction::Drain))
        ));
        assert!(route(&["nodes", "h:1", "explode"]).is_none());
        assert!(route(&[""]).is_none());
    }
}
