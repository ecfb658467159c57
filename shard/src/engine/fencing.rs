//! Phase: database fences. A unit that needs its database to itself (DROP DATABASE,
//! ALTER DATABASE … RENAME, CREATE DATABASE … TEMPLATE) first has every shard close its
//! idle connections there and hold new ones back; the fence stays up until the unit is
//! over (see [`crate::fence`]).

use super::phase::{Phase, Start};
use super::session::Session;
use super::unit::Unit;

pub struct Fencing;

impl Phase for Fencing {
    async fn unit_start(&self, s: &mut Session, u: &mut Unit, request: &[u8]) -> Start {
        if let Some(database) = crate::sql::exclusive::exclusive_database_in(request) {
            // Boxed: rare, and kept out of the state an idle session carries.
            u.fence = Some(Box::pin(crate::fence::fence_database(&s.ctx, &database)).await);
        }
        Start::Continue
    }
}
