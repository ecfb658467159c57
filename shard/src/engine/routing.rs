//! Phase: read/write routing. Before each unit of work takes a server connection, the
//! buffered request is analysed (each Query and Parse text once — the analysis is shared
//! with the pump's phases; a Bind of a prepared statement uses the analysis cached on the
//! statement) and the router picks the node. After a unit that may have written ran on the primary, the session
//! remembers the primary's WAL position, so its later reads wait for a replica that has
//! replayed that far (read-your-writes).

use std::rc::Rc;

use crate::backend::{BackendConn, BackendError};
use crate::codec::frame::split_message;
use crate::codec::frontend::{self, FrontendMessage};
use crate::config::NodeRole;
use crate::context::{ShardCtx, UserEntry};
use crate::lease::Lease;
use crate::pool::Pool;
use crate::router::{self, Reason, Want};
use crate::sql::route::analyze;
use crate::topology::LocalNode;

use super::phase::Phase;
use super::prepared::ClientStatements;
use super::session::Session;
use super::unit::{Analysis, Unit, UnitSql};

/// The pools a client has used, one per node (for its database and role).
#[derive(Default)]
pub struct NodePools(Vec<Rc<Pool>>);

impl NodePools {
    pub fn on(
        &mut self,
        ctx: &ShardCtx,
        node: &LocalNode,
        database: &str,
        user: &UserEntry,
    ) -> Rc<Pool> {
        if let Some(pool) = self.0.iter().find(|p| p.key.node == node.address) {
            return pool.clone();
        }
        let pool = ctx.pool(node, database, user);
        self.0.push(pool.clone());
        pool
    }

    pub fn in_use(&self, node: &LocalNode) -> usize {
        self.0
            .iter()
            .find(|p| p.key.node == node.address)
            .map_or(0, |p| p.in_use())
    }
}

pub struct Routing;

impl Phase for Routing {
    /// With read/write splitting on, picks the node for the unit whose first bytes are
    /// `request` (else the session's home pool serves it).
    fn choose_node(&self, s: &mut Session, u: &mut Unit, request: &[u8]) -> Option<Rc<Pool>> {
        if !s.features.read_write_split || s.pinned {
            return None;
        }
        let ctx = s.ctx.clone();
        let config = ctx.config();
        let want = request_want(&ctx, request, u.position, &s.statements, &mut u.sql);
        let nodes = ctx.nodes.borrow();
        let (node, _) = ctx.router.choose(
            &nodes,
            &want,
            config.load_balancer.read_strategy,
            &config.routing,
            s.wrote_at,
            &|n| s.pools.in_use(n),
        )?;
        let has_read_nodes = nodes.iter().any(|n| n.role != NodeRole::Primary);
        drop(nodes);
        let on_primary = node.role == NodeRole::Primary;
        u.on_read_node = !on_primary;
        u.remember_position =
            on_primary && want.may_write() && config.routing.read_your_writes && has_read_nodes;
        Some(s.pools.on(&ctx, &node, &s.home.key.database, &s.user))
    }

    /// After a unit that may have written: the primary's WAL position, which the
    /// session's later reads wait for replicas to reach.
    async fn unit_done(
        &self,
        s: &mut Session,
        u: &mut Unit,
        backend: &mut Lease,
    ) -> Result<(), BackendError> {
        if !u.remember_position {
            return Ok(());
        }
        let mut buf = s.ctx.bufs.take();
        let lsn = Box::pin(write_position(backend, &mut buf)).await?;
        log::debug!(
            target: "heliosdb_proxy::routing",
            "client {}: wrote up to WAL position {lsn:?}",
            s.pid()
        );
        s.wrote_at = s.wrote_at.max(lsn.unwrap_or(0));
        Ok(())
    }
}

/// What the complete units at the front of `pending` need. Anything incomplete or not
/// understood needs the primary.
fn request_want(
    ctx: &ShardCtx,
    pending: &[u8],
    position: u64,
    statements: &ClientStatements,
    sql: &mut UnitSql,
) -> Want {
    let functions = ctx.read_only_functions.borrow();
    let routes = ctx.schema_routes.borrow();
    let mut rest = pending;
    let mut analyse = |text: &[u8], at: usize| {
        let route = Rc::new(analyze(text, &functions));
        let want = router::want(&route, &routes);
        sql.push(
            position + at as u64,
            Analysis {
                effects: crate::sql::classify(text),
                route: Some(route),
            },
        );
        want
    };
    let mut combined: Option<Want> = None;
    let mut at_unit_end = false;
    while !rest.is_empty() {
        let Ok(Some((tag, body, len))) = split_message(rest, usize::MAX >> 1) else {
            // A message still arriving: the unit cannot be judged whole.
            return Want::Primary(Reason::Write);
        };
        let at = pending.len() - rest.len();
        rest = &rest[len..];
        let this = match frontend::decode(tag, body) {
            Ok(FrontendMessage::Query(text)) => {
                at_unit_end = true;
                Some(analyse(text, at))
            }
            Ok(FrontendMessage::Parse { query, .. }) => {
                at_unit_end = false;
                Some(analyse(query, at))
            }
            Ok(FrontendMessage::Bind(bind)) => {
                at_unit_end = false;
                let name = bind.statement();
                if name.is_empty() && combined.is_some() {
                    None // its Parse came just before
                } else {
                    Some(match statements.analysis(name, &functions) {
                        Some(analysis) => router::want(&analysis, &routes),
                        None => Want::Primary(Reason::Write),
                    })
                }
            }
            Ok(FrontendMessage::Sync) => {
                at_unit_end = true;
                None
            }
            Ok(
                FrontendMessage::Describe { .. }
                | FrontendMessage::Execute { .. }
                | FrontendMessage::Close { .. }
                | FrontendMessage::Flush,
            ) => {
                at_unit_end = false;
                None
            }
            _ => return Want::Primary(Reason::Write),
        };
        combined = match (combined, this) {
            (Some(w @ Want::Primary(_)), _) | (None, Some(w)) => Some(w),
            (Some(Want::Read(..)), Some(w @ Want::Primary(_))) => Some(w),
            (w, _) => w,
        };
    }
    match combined {
        Some(want) if at_unit_end => want,
        _ => Want::Primary(Reason::Write),
    }
}

/// Reads the primary's WAL insert position after a unit that may have written: the end of
/// everything logged so far, the unit's commit record included. (`pg_current_wal_lsn()`
/// is the *write* position, which trails it under asynchronous commit.)
pub async fn write_position(
    backend: &mut BackendConn,
    buf: &mut [u8],
) -> Result<Option<u64>, crate::backend::BackendError> {
    let mut request = Vec::with_capacity(40);
    frontend::encode_query(&mut request, "SELECT pg_current_wal_insert_lsn()");
    let (rows, error) = backend.fetch(&request, 1, buf).await?;
    if error.is_some() {
        return Ok(None);
    }
    Ok(rows
        .first()
        .and_then(|row| row.first())
        .and_then(|v| v.as_deref())
        .and_then(crate::control::parse_lsn))
}
