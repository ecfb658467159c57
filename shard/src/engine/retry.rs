//! Phase: retry on a fresh connection. A pooled connection can break while idle (the
//! server restarted, or closed it); if it is found broken before any of the unit's bytes
//! were sent, the unit takes another connection instead of failing the client.

use super::phase::{Lost, LostAt, Phase};
use super::session::Session;
use super::unit::Unit;

/// Broken connections one unit may step over before the client is told.
const ATTEMPTS: u32 = 3;

pub struct Retry;

impl Phase for Retry {
    fn backend_lost(&self, _s: &mut Session, u: &mut Unit, at: LostAt) -> Lost {
        u.lost_connections += 1;
        if at == LostAt::AfterAcquire && u.lost_connections < ATTEMPTS {
            Lost::Retry
        } else {
            Lost::Fail
        }
    }
}
