//! The replay journal of one unit of work (`failover.replay`): the client's bytes of
//! the unit as it sent them, and a count and running digest of every byte the client
//! received during it. A replay feeds the bytes to a new server connection as if the
//! client sent them again and checks that the first bytes it produces for the client are
//! exactly those the client already has (same count, same digest) before anything more
//! reaches the client. Nothing here exists when replay is off.

use hashbrown::HashMap;
use xxhash_rust::xxh64::Xxh64;

use crate::codec::frame::{read_header, split_cstr};
use crate::codec::tag::fe;
use crate::sql::route::{analyze, ReadOnlyFunctions};

use super::prepared::ClientStatements;

/// A journal buffer larger than this is not kept from one unit to the next.
const KEEP_CAPACITY: usize = 16 * 1024;

/// The client's bytes of the current unit, in order, up to a bound.
pub struct ClientJournal {
    bytes: Vec<u8>,
    max: usize,
    /// The unit outgrew the bound: it is not replayable.
    pub overflowed: bool,
}

impl ClientJournal {
    pub fn new(max: usize) -> Self {
        ClientJournal {
            bytes: Vec::new(),
            max,
            overflowed: false,
        }
    }

    pub fn record(&mut self, bytes: &[u8]) {
        if self.overflowed {
            return;
        }
        if self.bytes.len() + bytes.len() > self.max {
            self.overflowed = true;
            self.bytes = Vec::new();
            return;
        }
        self.bytes.extend_from_slice(bytes);
    }

    /// Forgets what was recorded after the first `len` bytes (they will be decided, and
    /// recorded, again).
    pub fn truncate(&mut self, len: usize) {
        if !self.overflowed {
            self.bytes.truncate(len);
        }
    }

    /// The rest of the unit is not replayable.
    pub fn give_up(&mut self) {
        self.overflowed = true;
        self.bytes = Vec::new();
    }

    /// A new unit begins.
    pub fn reset(&mut self) {
        self.overflowed = false;
        self.bytes.clear();
        if self.bytes.capacity() > KEEP_CAPACITY {
            self.bytes = Vec::new();
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Takes the recorded bytes for a replay, which records them again as it goes.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes)
    }
}

/// What the client received during the unit.
pub struct Delivered {
    count: u64,
    digest: Xxh64,
    /// A replay under way: the bytes it must reproduce before the client hears more.
    verify: Option<Verify>,
}

/// A replay's check of the bytes the client already has.
struct Verify {
    left: u64,
    digest: Xxh64,
    expect: u64,
}

/// The outcome of swallowing replayed bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Swallowed {
    /// More are expected.
    More,
    /// The replay reproduced what the client has: from here on the client hears it.
    Matched,
    /// It did not.
    Diverged,
}

impl Default for Delivered {
    fn default() -> Self {
        Delivered {
            count: 0,
            digest: Xxh64::new(0),
            verify: None,
        }
    }
}

impl Delivered {
    /// A new unit begins.
    pub fn reset(&mut self) {
        self.count = 0;
        self.digest.reset(0);
        self.verify = None;
    }

    /// Bytes written to the client.
    pub fn record(&mut self, bytes: &[u8]) {
        self.count += bytes.len() as u64;
        self.digest.update(bytes);
    }

    /// How many bytes the client received during the unit.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Their digest (xxh64, seed 0).
    pub fn digest(&self) -> u64 {
        self.digest.digest()
    }

    /// A replay starts: what it produces for the client is checked against what the
    /// client has before any of it is written.
    pub fn start_verify(&mut self) {
        self.verify = (self.count > 0).then(|| Verify {
            left: self.count,
            digest: Xxh64::new(0),
            expect: self.digest.digest(),
        });
    }

    pub fn verifying(&self) -> bool {
        self.verify.is_some()
    }

    /// Replayed bytes that the client already has: at most how many it takes of
    /// `bytes`, and whether the check is over.
    pub fn swallow(&mut self, bytes: &[u8]) -> (usize, Swallowed) {
        let Some(verify) = self.verify.as_mut() else {
            return (0, Swallowed::Matched);
        };
        let n = (verify.left.min(bytes.len() as u64)) as usize;
        verify.digest.update(&bytes[..n]);
        verify.left -= n as u64;
        if verify.left > 0 {
            return (n, Swallowed::More);
        }
        let matched = verify.digest.digest() == verify.expect;
        self.verify = None;
        (
            n,
            if matched {
                Swallowed::Matched
            } else {
                Swallowed::Diverged
            },
        )
    }
}

/// Journal bytes a replay feeds to the pump ahead of the client's socket. Bytes past
/// `gate` (those the client had sent but the lost connection never got) wait until the
/// replay has reproduced what the client already has: nothing new may run, a COMMIT
/// least of all, on a replay that may yet diverge.
pub struct ReplaySource {
    pub bytes: Vec<u8>,
    pub pos: usize,
    pub gate: usize,
}

impl ReplaySource {
    pub fn is_done(&self) -> bool {
        self.pos == self.bytes.len()
    }
}

/// Why a lost unit may not simply run again from its start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotRerunnable {
    /// It wrote outside a transaction block: that write may have committed.
    WroteOutsideTransaction,
    /// It ended a transaction block that may have committed.
    Committed,
    /// It ran something whose effect the proxy cannot tell (a FunctionCall, or a
    /// statement it cannot find the text of).
    Unknown,
}

/// Whether the unit whose client bytes are `journal` may run again from its start on
/// another server: nothing of it can have committed. Statements inside a transaction
/// block it opened may write (none of that committed before a COMMIT, which is not
/// re-run); outside one, only reads may re-run. `names` are the client's statement names
/// as they were when the unit began. With `last_unexecuted`, the server provably never
/// ran the unit's last statement (it died waiting for it): that one may be a COMMIT or
/// a write outside a block.
pub fn rerunnable(
    journal: &[u8],
    names: &ClientStatements,
    functions: &ReadOnlyFunctions,
    last_unexecuted: bool,
) -> Result<(), NotRerunnable> {
    let statements = executed_statements(journal, names)?;
    let mut in_block = false;
    for (i, sql) in statements.iter().enumerate() {
        let last = i + 1 == statements.len();
        let effects = crate::sql::classify(sql);
        let verdict = if effects.may_commit {
            Err(NotRerunnable::Committed)
        } else if !in_block && !effects.opens_transaction && !analyze(sql, functions).read_only {
            Err(NotRerunnable::WroteOutsideTransaction)
        } else {
            Ok(())
        };
        match verdict {
            Err(_) if last && last_unexecuted => {}
            other => other?,
        }
        if effects.opens_transaction {
            in_block = true;
        } else if effects.ends_transaction {
            in_block = false;
        }
    }
    Ok(())
}

/// The SQL texts the journal's messages ran, in order: each simple Query, and the
/// statement behind each Execute's portal.
pub fn executed_statements<'a>(
    journal: &'a [u8],
    names: &'a ClientStatements,
) -> Result<Vec<&'a [u8]>, NotRerunnable> {
    let mut statements = Vec::new();
    let mut parsed: HashMap<&[u8], &[u8]> = HashMap::new();
    let mut portals: HashMap<&[u8], &[u8]> = HashMap::new();
    let mut rest = journal;
    while let Ok(Some((tag, len))) = read_header(rest, usize::MAX >> 1) {
        if len > rest.len() {
            // The unit's last message, not all in yet: it has not run.
            break;
        }
        let body = &rest[5..len];
        rest = &rest[len..];
        match tag {
            fe::QUERY => statements.push(body.strip_suffix(b"\0").unwrap_or(body)),
            fe::PARSE => {
                let (name, spec) = split_cstr(body).ok_or(NotRerunnable::Unknown)?;
                let (sql, _) = split_cstr(spec).ok_or(NotRerunnable::Unknown)?;
                parsed.insert(name, sql);
            }
            // A closed statement's name no longer runs its old text.
            fe::CLOSE if body.first() == Some(&b'S') => {
                let (name, _) = split_cstr(&body[1..]).ok_or(NotRerunnable::Unknown)?;
                parsed.insert(name, b"");
            }
            fe::BIND => {
                let (portal, spec) = split_cstr(body).ok_or(NotRerunnable::Unknown)?;
                let (name, _) = split_cstr(spec).ok_or(NotRerunnable::Unknown)?;
                let sql = parsed
                    .get(name)
                    .copied()
                    .or_else(|| names.text_at_unit_start(name))
                    .ok_or(NotRerunnable::Unknown)?;
                portals.insert(portal, sql);
            }
            fe::EXECUTE => {
                let (portal, _) = split_cstr(body).ok_or(NotRerunnable::Unknown)?;
                statements.push(portals.get(portal).copied().ok_or(NotRerunnable::Unknown)?);
            }
            fe::FUNCTION_CALL => return Err(NotRerunnable::Unknown),
            _ => {}
        }
    }
    Ok(statements)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_stops_recording_beyond_its_bound() {
        let mut j = ClientJournal::new(8);
        j.record(b"abcd");
        j.record(b"efgh");
        assert_eq!(j.bytes(), b"abcdefgh");
        j.record(b"i");
        assert!(j.overflowed);
        assert!(j.is_empty());
        j.reset();
        assert!(!j.overflowed);
    }

    #[test]
    fn a_replay_matches_whatever_way_its_bytes_are_split() {
        let mut d = Delivered::default();
        d.record(b"hello ");
        d.record(b"world");
        d.start_verify();
        assert_eq!(d.swallow(b"hel"), (3, Swallowed::More));
        assert_eq!(d.swallow(b"lo wor"), (6, Swallowed::More));
        assert_eq!(d.swallow(b"ld and more"), (2, Swallowed::Matched));
        assert!(!d.verifying());
        // The count and digest go on from where they were.
        d.record(b"!");
        assert_eq!(d.count(), 12);
    }

    fn query(sql: &str) -> Vec<u8> {
        let mut out = Vec::new();
        crate::codec::frontend::encode_query(&mut out, sql);
        out
    }

    fn judge(messages: &[Vec<u8>]) -> Result<(), NotRerunnable> {
        let journal: Vec<u8> = messages.concat();
        let functions = ReadOnlyFunctions::new(&[]);
        rerunnable(&journal, &ClientStatements::default(), &functions, false)
    }

    #[test]
    fn writes_inside_a_block_rerun_and_writes_outside_do_not() {
        assert_eq!(
            judge(&[
                query("BEGIN"),
                query("UPDATE t SET a = 1"),
                query("SELECT a FROM t")
            ]),
            Ok(())
        );
        assert_eq!(judge(&[query("SELECT 1"), query("SELECT 2")]), Ok(()));
        assert_eq!(
            judge(&[query("INSERT INTO t VALUES (1)"), query("BEGIN")]),
            Err(NotRerunnable::WroteOutsideTransaction)
        );
        assert_eq!(
            judge(&[query("BEGIN"), query("ROLLBACK"), query("DELETE FROM t")]),
            Err(NotRerunnable::WroteOutsideTransaction)
        );
        assert_eq!(
            judge(&[query("BEGIN"), query("UPDATE t SET a = 1"), query("COMMIT")]),
            Err(NotRerunnable::Committed)
        );
    }

    #[test]
    fn a_last_commit_the_server_never_ran_may_run_again() {
        let journal = [query("BEGIN"), query("UPDATE t SET a = 1"), query("COMMIT")].concat();
        let names = ClientStatements::default();
        let functions = ReadOnlyFunctions::new(&[]);
        assert_eq!(rerunnable(&journal, &names, &functions, true), Ok(()));
        let journal = [query("INSERT INTO t VALUES (1)"), query("SELECT 1")].concat();
        assert_eq!(
            rerunnable(&journal, &names, &functions, true),
            Err(NotRerunnable::WroteOutsideTransaction)
        );
    }

    #[test]
    fn extended_statements_are_judged_by_the_text_their_portal_runs() {
        let mut parse = Vec::new();
        crate::codec::frame::write_parts(
            &mut parse,
            fe::PARSE,
            &[b"s1\0", b"UPDATE t SET a = 2\0", &[0, 0]],
        );
        let mut bind = Vec::new();
        crate::codec::frame::write_parts(
            &mut bind,
            fe::BIND,
            &[b"\0", b"s1\0", &[0, 0, 0, 0, 0, 0]],
        );
        let mut execute = Vec::new();
        crate::codec::frame::write_parts(&mut execute, fe::EXECUTE, &[b"\0", &[0, 0, 0, 0]]);
        let sync = vec![fe::SYNC, 0, 0, 0, 4];
        assert_eq!(
            judge(&[parse.clone(), bind.clone(), execute.clone(), sync.clone()]),
            Err(NotRerunnable::WroteOutsideTransaction)
        );
        assert_eq!(judge(&[query("BEGIN"), parse, bind, execute, sync]), Ok(()));
    }

    #[test]
    fn a_replay_that_differs_is_caught() {
        let mut d = Delivered::default();
        d.record(b"balance 100");
        d.start_verify();
        assert_eq!(d.swallow(b"balance 101"), (11, Swallowed::Diverged));
        let mut none = Delivered::default();
        none.start_verify();
        assert!(!none.verifying());
    }
}
