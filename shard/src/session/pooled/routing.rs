//! Read/write splitting for a pooled client: before each unit of work takes a server
//! connection, the buffered request is analysed (each Query and Parse text once; a Bind
//! of a prepared statement uses the analysis cached on the statement) and the router
//! picks the node. After a unit that may have written ran on the primary, the session
//! remembers the primary's WAL position, so its later reads wait for a replica that has
//! replayed that far (read-your-writes).

use std::rc::Rc;

use crate::backend::BackendConn;
use crate::codec::frame::split_message;
use crate::codec::frontend::{self, FrontendMessage};
use crate::config::NodeRole;
use crate::context::{ShardCtx, UserEntry};
use crate::pool::Pool;
use crate::router::{self, Reason, Want};
use crate::sql::route::analyze;
use crate::topology::LocalNode;

use super::upstream::ClientStatements;

/// The pools a client has used, one per node (for its database and role).
#[derive(Default)]
pub struct NodePools(Vec<Rc<Pool>>);

impl NodePools {
    fn on(
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

    fn in_use(&self, node: &LocalNode) -> usize {
        self.0
            .iter()
            .find(|p| p.key.node == node.address)
            .map_or(0, |p| p.in_use())
    }
}

/// Where one unit of work runs.
pub struct Routed {
    pub pool: Rc<Pool>,
    /// The unit runs on a standby or replica: read no further client input while the
    /// server connection is idle in a transaction-less state, so the next unit is routed
    /// on its own.
    pub on_read_node: bool,
    /// Fetch the primary's WAL position after the unit (read-your-writes).
    pub remember_position: bool,
}

/// Picks the pool for the unit whose first bytes are `pending`. Without read/write
/// splitting that is `home`, the primary's pool.
pub fn route(
    ctx: &ShardCtx,
    home: &Rc<Pool>,
    pending: &[u8],
    statements: &ClientStatements,
    pools: &mut NodePools,
    user: &UserEntry,
    wrote_at: u64,
) -> Routed {
    let config = ctx.config();
    let home_unit = || Routed {
        pool: home.clone(),
        on_read_node: false,
        remember_position: false,
    };
    if !config.load_balancer.read_write_split {
        return home_unit();
    }
    let want = request_want(ctx, pending, statements);
    let nodes = ctx.nodes.borrow();
    let Some((node, _)) = ctx.router.choose(
        &nodes,
        &want,
        config.load_balancer.read_strategy,
        &config.routing,
        wrote_at,
        &|n| pools.in_use(n),
    ) else {
        return home_unit();
    };
    let has_read_nodes = nodes.iter().any(|n| n.role != NodeRole::Primary);
    drop(nodes);
    let on_primary = node.role == NodeRole::Primary;
    let pool = pools.on(ctx, &node, &home.key.database, user);
    Routed {
        pool,
        on_read_node: !on_primary,
        remember_position: on_primary
            && want.may_write()
            && config.routing.read_your_writes
            && has_read_nodes,
    }
}

/// What the complete units at the front of `pending` need. Anything incomplete or not
/// understood needs the primary.
fn request_want(ctx: &ShardCtx, pending: &[u8], statements: &ClientStatements) -> Want {
    let functions = ctx.read_only_functions.borrow();
    let routes = ctx.schema_routes.borrow();
    let mut rest = pending;
    let mut combined: Option<Want> = None;
    let mut at_unit_end = false;
    while !rest.is_empty() {
        let Ok(Some((tag, body, len))) = split_message(rest, usize::MAX >> 1) else {
            // A message still arriving: the unit cannot be judged whole.
            return Want::Primary(Reason::Write);
        };
        rest = &rest[len..];
        let this = match frontend::decode(tag, body) {
            Ok(FrontendMessage::Query(sql)) => {
                at_unit_end = true;
                Some(router::want(&analyze(sql, &functions), &routes))
            }
            Ok(FrontendMessage::Parse { query, .. }) => {
                at_unit_end = false;
                Some(router::want(&analyze(query, &functions), &routes))
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
