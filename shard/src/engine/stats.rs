//! Phase: statistics. Counts queries and statements by kind, and records how long each
//! request took from its first message to the ReadyForQuery that answered everything.

use crate::codec::tag::{be, fe};

use super::phase::{Phase, Wire};

pub struct Statistics;

impl Phase for Statistics {
    fn client_tag(&self, w: &mut Wire<'_>, tag: u8) {
        match tag {
            fe::QUERY | fe::FUNCTION_CALL | fe::EXECUTE => w.stats.queries.inc(),
            _ => {}
        }
        if matches!(tag, fe::QUERY | fe::FUNCTION_CALL | fe::SYNC) && w.flow.since.is_none() {
            w.flow.since = Some(std::time::Instant::now());
        }
    }

    fn server_message(&self, w: &mut Wire<'_>, tag: u8, body: &[u8]) {
        match tag {
            be::COMMAND_COMPLETE => w.stats.count_statement(body),
            be::READY_FOR_QUERY if w.answered => {
                if let Some(since) = w.flow.since.take() {
                    w.stats
                        .query_duration
                        .record_us(since.elapsed().as_micros() as u64);
                }
            }
            _ => {}
        }
    }
}
