//! The per-message context the pump hands to [`super::phase::Phase::client_message`]:
//! the client's and the connection's statements, the queue of answers the server owes,
//! the lease's notes and the unit's shared SQL analyses.

use std::rc::Rc;

use crate::codec::tag::fe;
use crate::prepared::{Registry, ServerStatements};

use super::prepared::ClientStatements;
use super::responses::{Expect, Outcome, Responses};
use super::session::Features;
use super::unit::{Analysis, LeaseNotes, UnitSql};

pub struct MessageCx<'a> {
    pub features: &'a Features,
    pub registry: &'a Registry,
    pub client: &'a mut ClientStatements,
    pub server: &'a mut ServerStatements,
    pub pending_close: &'a mut Vec<Rc<str>>,
    pub responses: &'a mut Responses,
    pub notes: &'a mut LeaseNotes,
    pub sql: &'a mut UnitSql,
    /// Where the message being decided starts in the client's byte stream (matches the
    /// analyses made ahead).
    pub offset: u64,
    /// The unit's result-cache work.
    pub cache: &'a mut super::cache::CacheUnit,
}

impl MessageCx<'_> {
    /// Queues an answer the server will owe.
    pub fn expect(&mut self, expect: Expect) {
        let mut outcome = Outcome::default();
        self.responses.push(expect, self.server, &mut outcome);
        self.client.settle(&mut outcome);
        self.pending_close.extend(outcome.to_close);
    }

    /// Queues what the server owes for a message forwarded unchanged.
    pub fn expect_forwarded(&mut self, tag: u8) {
        let expect = match tag {
            fe::QUERY => {
                // A simple Query ends any extended-protocol sequence.
                self.responses.unsynced = false;
                Expect::Query
            }
            fe::FUNCTION_CALL => Expect::Query,
            fe::SYNC => {
                self.responses.unsynced = false;
                Expect::Sync
            }
            fe::PARSE => Expect::Parse {
                prepares: None,
                client: None,
            },
            fe::BIND => Expect::Bind(None),
            fe::DESCRIBE => Expect::Describe(None),
            fe::EXECUTE => Expect::Execute,
            fe::CLOSE => Expect::Close,
            // Flush, CopyData, CopyDone, CopyFail: no answer of their own.
            _ => return,
        };
        if tag != fe::QUERY && tag != fe::FUNCTION_CALL && tag != fe::SYNC {
            self.responses.unsynced = true;
        }
        self.expect(expect);
    }

    /// The shared analysis of the SQL text of the message being decided: the one made
    /// ahead for routing, or one made now.
    pub fn analysis(&mut self, sql: &[u8]) -> Analysis {
        match self.sql.take(self.offset) {
            Some(analysis) => analysis,
            None => Analysis {
                effects: crate::sql::classify(sql),
                route: None,
            },
        }
    }
}
