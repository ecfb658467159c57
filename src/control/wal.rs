//! The cache's WAL followers (`[cache] invalidation = "wal"`): for every database the
//! shards cache results of, a thread follows the primary's WAL through logical decoding
//! and invalidates the tables each committed transaction changed, so writes that never
//! passed through the proxy are seen too, within the follower's lag.
//!
//! Each follower logs in twice: a logical replication connection that creates a
//! TEMPORARY slot with the `test_decoding` plugin (the server drops the slot when the
//! connection ends, however it ends: no slot is left to pin WAL) and streams from it; and
//! a plain connection that maps the table names the stream reports to the roots of
//! their inheritance trees, which is what the shards' table slots are. test_decoding
//! needs no publication: a publication that publishes UPDATE and DELETE would make
//! those fail on every table without a replica identity.
//!
//! Until a follower streams, the shards store no result of its database; when it starts
//! (and whenever it loses its stream) everything cached is invalidated, since a write
//! may have gone unseen.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use helios_shard::cache::{slot, Epochs, WalFollow};
use helios_shard::config::{CacheInvalidation, NodeRole};

use super::probe::{Probe, ProbeError, Target};
use super::Control;

/// How often the supervisor looks for databases to follow (and followers to stop).
const SUPERVISE_EVERY: Duration = Duration::from_millis(100);
/// How long a follower waits for one message before doing its housekeeping.
const POLL: Duration = Duration::from_millis(100);
/// The standby status update interval (it lets the server recycle WAL).
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// Connecting, logging in and starting the stream.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a table name's roots are trusted.
const NAME_LIFETIME: Duration = Duration::from_secs(60);
/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Starts the supervisor thread.
pub fn spawn(control: Arc<Control>, stop: Arc<AtomicBool>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("cache-wal".into())
        .spawn(move || supervise(&control, &stop))
}

struct Running {
    database: String,
    halt: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

fn supervise(control: &Arc<Control>, stop: &AtomicBool) {
    let mut running: Vec<Running> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let config = control.config();
        let wanted = config.cache.enabled && config.cache.invalidation == CacheInvalidation::Wal;
        if wanted {
            for (database, follow) in control.cache_epochs.wal_follows() {
                if running.iter().any(|r| r.database == database) {
                    continue;
                }
                let halt = Arc::new(AtomicBool::new(false));
                let (c, db, h) = (control.clone(), database.clone(), halt.clone());
                match std::thread::Builder::new()
                    .name(format!("cache-wal-{database}"))
                    .spawn(move || follow_database(&c, &db, &follow, &h))
                {
                    Ok(thread) => running.push(Running {
                        database,
                        halt,
                        thread,
                    }),
                    Err(e) => {
                        log::error!("cache: cannot start the WAL follower of {database}: {e}")
                    }
                }
            }
        } else {
            halt_all(&mut running);
        }
        std::thread::sleep(SUPERVISE_EVERY);
    }
    halt_all(&mut running);
}

fn halt_all(running: &mut Vec<Running>) {
    for r in running.iter() {
        r.halt.store(true, Ordering::Release);
    }
    for r in running.drain(..) {
        let _ = r.thread.join();
    }
}

/// Follows `database` until halted, reconnecting after a failure.
fn follow_database(control: &Control, database: &str, follow: &WalFollow, halt: &AtomicBool) {
    let mut backoff = Duration::from_millis(100);
    while !halt.load(Ordering::Acquire) {
        let result = stream(control, database, follow, halt);
        follow.ready.store(false, Ordering::SeqCst);
        follow
            .slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        match result {
            Ok(()) => break,
            Err(e) => {
                // Writes may go unseen until the stream is back: nothing cached stays.
                control.cache_epochs.invalidate_all();
                log::warn!("cache: WAL follower of {database}: {e}; retrying in {backoff:?}");
                *follow.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                let until = Instant::now() + backoff;
                while Instant::now() < until && !halt.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    follow.ready.store(false, Ordering::SeqCst);
}

/// One stream, from login to halt (`Ok`) or failure.
fn stream(
    control: &Control,
    database: &str,
    follow: &WalFollow,
    halt: &AtomicBool,
) -> Result<(), String> {
    let config = control.config();
    let node = control
        .nodes()
        .into_iter()
        .find(|n| n.node.role == NodeRole::Primary && n.node.enabled)
        .ok_or("no primary to follow")?;
    let (user, password) = config.wal_credentials();
    let tls = helios_shard::tls::server_connector(&config.tls)
        .map_err(|e| format!("{}: {}", e.key, e.message))?;
    let target = Target {
        addr: &node.node.addr,
        user: &user,
        password: password.as_deref(),
        database,
        tls: tls.as_ref(),
        address: &node.node.address,
    };
    let deadline = Instant::now() + START_TIMEOUT;
    let failed = |what: &str, e: ProbeError| format!("{what} on {}: {e}", node.node.address);
    let mut names = Names::new(
        Probe::connect(target, deadline).map_err(|e| failed("logging in", e))?,
        database,
    );
    let mut repl = Probe::connect_replication(target, deadline)
        .map_err(|e| failed("logging in for replication", e))?;
    let slot_name = slot_name(database);
    repl.query(
        &format!(
            "CREATE_REPLICATION_SLOT {slot_name} TEMPORARY LOGICAL test_decoding NOEXPORT_SNAPSHOT"
        ),
        deadline,
    )
    .map_err(|e| failed("creating the replication slot", e))?;
    repl.start_copy_both(
        &format!(
            "START_REPLICATION SLOT {slot_name} LOGICAL 0/0 (\"include-xids\" '0', \"skip-empty-xacts\" '1')"
        ),
        deadline,
    )
    .map_err(|e| failed("starting replication", e))?;
    *follow.slot.lock().unwrap_or_else(|e| e.into_inner()) = slot_name.clone();
    *follow.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
    // Whatever was stored before the stream began may have missed a write.
    control.cache_epochs.invalidate_all();
    follow.ready.store(true, Ordering::SeqCst);
    log::info!(
        "cache: following the WAL of {database} on {} (slot {slot_name})",
        node.node.address
    );
    let mut decoder = Decoder::default();
    let mut last_status = Instant::now();
    loop {
        if halt.load(Ordering::Acquire) || !still_wanted(control) {
            repl.end_copy(Instant::now() + Duration::from_secs(2));
            names.probe.terminate();
            return Ok(());
        }
        let mut reply = false;
        match repl.copy_data(Instant::now() + POLL) {
            Ok(Some(data)) => {
                reply = decoder.message(&data, &mut names, &control.cache_epochs, follow)?;
            }
            Ok(None) => return Err("the server ended the stream".into()),
            Err(ProbeError::Timeout(_)) => {}
            Err(e) => return Err(failed("streaming", e)),
        }
        if reply || last_status.elapsed() >= STATUS_EVERY {
            repl.send_copy_data(
                &status_update(decoder.confirmed),
                Instant::now() + START_TIMEOUT,
            )
            .map_err(|e| failed("reporting progress", e))?;
            last_status = Instant::now();
        }
    }
}

fn still_wanted(control: &Control) -> bool {
    let config = control.config();
    config.cache.enabled && config.cache.invalidation == CacheInvalidation::Wal
}

/// A slot name unique to this process and database (letters, digits, underscores).
fn slot_name(database: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    database.hash(&mut h);
    format!(
        "helios_cache_{}_{:08x}",
        std::process::id(),
        h.finish() as u32
    )
}

/// The stream's state between messages.
#[derive(Default)]
struct Decoder {
    /// Tables the transaction being decoded changed.
    changed: Vec<String>,
    /// How far the follower has applied everything (reported to the server).
    confirmed: u64,
    /// The server's WAL end, as last reported.
    server_end: u64,
    in_transaction: bool,
}

impl Decoder {
    /// One CopyData message; returns whether the server asked for a reply.
    fn message(
        &mut self,
        data: &[u8],
        names: &mut Names,
        epochs: &Epochs,
        follow: &WalFollow,
    ) -> Result<bool, String> {
        let u64_at = |at: usize| -> Result<u64, String> {
            data.get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| "a truncated replication message".to_string())
        };
        match data.first() {
            // XLogData: start, server end, send time, then the plugin's text.
            Some(b'w') => {
                let start = u64_at(1)?;
                self.server_end = self.server_end.max(u64_at(9)?);
                let sent = u64_at(17)? as i64;
                let text = data.get(25..).unwrap_or_default();
                self.decoded(text, start, sent, names, epochs, follow)?;
                self.report(follow);
                Ok(false)
            }
            // Keepalive: server end, send time, reply requested.
            Some(b'k') => {
                let end = u64_at(1)?;
                self.server_end = self.server_end.max(end);
                if !self.in_transaction {
                    // Nothing of ours is pending up to the server's end.
                    self.confirmed = self.confirmed.max(end);
                }
                self.report(follow);
                Ok(data.get(17) == Some(&1))
            }
            _ => Ok(false),
        }
    }

    fn decoded(
        &mut self,
        text: &[u8],
        lsn: u64,
        sent: i64,
        names: &mut Names,
        epochs: &Epochs,
        follow: &WalFollow,
    ) -> Result<(), String> {
        if text.starts_with(b"BEGIN") {
            self.changed.clear();
            self.in_transaction = true;
        } else if text.starts_with(b"COMMIT") {
            let mut slots = Vec::new();
            let mut unknown = false;
            for table in self.changed.drain(..) {
                match names.roots(&table, epochs.catalog())? {
                    Some(found) => slots.extend(found),
                    None => unknown = true,
                }
            }
            if unknown {
                epochs.invalidate_all();
            } else if !slots.is_empty() {
                epochs.invalidate(&slots);
            }
            self.in_transaction = false;
            self.confirmed = self.confirmed.max(lsn);
            follow.applied_lsn.store(lsn, Ordering::SeqCst);
            follow.commits.fetch_add(1, Ordering::SeqCst);
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as i64)
                - PG_EPOCH_OFFSET_MICROS;
            follow
                .lag_micros
                .store(now.saturating_sub(sent).max(0) as u64, Ordering::SeqCst);
        } else if let Some(table) = table_name(text) {
            if !self.changed.contains(&table) {
                self.changed.push(table);
            }
        }
        Ok(())
    }

    fn report(&self, follow: &WalFollow) {
        follow.lag_bytes.store(
            self.server_end.saturating_sub(self.confirmed),
            Ordering::SeqCst,
        );
    }
}

/// The table of a test_decoding change line (`table public.t: INSERT: …`), as the
/// plugin quoted it (a name `to_regclass` reads back).
fn table_name(text: &[u8]) -> Option<String> {
    let rest = text.strip_prefix(b"table ")?;
    let mut quoted = false;
    let mut at = 0;
    while at < rest.len() {
        match rest[at] {
            b'"' => quoted = !quoted,
            b':' if !quoted => {
                return String::from_utf8(rest[..at].to_vec()).ok();
            }
            _ => {}
        }
        at += 1;
    }
    None
}

/// A standby status update: written, flushed and applied up to `lsn`.
fn status_update(lsn: u64) -> Vec<u8> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
        - PG_EPOCH_OFFSET_MICROS;
    let mut out = Vec::with_capacity(34);
    out.push(b'r');
    for _ in 0..3 {
        out.extend_from_slice(&lsn.to_be_bytes());
    }
    out.extend_from_slice(&now.to_be_bytes());
    out.push(0);
    out
}

/// Table names to the slots of their inheritance roots, asked on a plain connection and
/// remembered for a while.
struct Names {
    probe: Probe,
    database: String,
    known: HashMap<String, (Vec<u32>, Instant)>,
    /// The catalog epoch `known` was learned under: DDL through the proxy empties it.
    catalog: u64,
}

impl Names {
    fn new(probe: Probe, database: &str) -> Names {
        Names {
            probe,
            database: database.to_string(),
            known: HashMap::new(),
            catalog: 0,
        }
    }

    /// The slots `table` invalidates; `None` when the name resolves to nothing now.
    fn roots(&mut self, table: &str, catalog: u64) -> Result<Option<Vec<u32>>, String> {
        if catalog != self.catalog {
            self.known.clear();
            self.catalog = catalog;
        }
        if let Some((slots, at)) = self.known.get(table) {
            if at.elapsed() < NAME_LIFETIME {
                return Ok(Some(slots.clone()));
            }
        }
        let literal = table.replace('\'', "''");
        let sql = format!(
            "WITH RECURSIVE up(anc) AS (SELECT pg_catalog.to_regclass('{literal}')::pg_catalog.oid \
             UNION SELECT i.inhparent FROM up JOIN pg_catalog.pg_inherits i ON i.inhrelid = up.anc) \
             SELECT anc FROM up WHERE anc IS NOT NULL AND NOT EXISTS \
             (SELECT 1 FROM pg_catalog.pg_inherits i WHERE i.inhrelid = up.anc)"
        );
        let rows = self
            .probe
            .query(&sql, Instant::now() + START_TIMEOUT)
            .map_err(|e| format!("resolving {table}: {e}"))?;
        let slots: Vec<u32> = rows
            .iter()
            .filter_map(|r| r.first().cloned().flatten())
            .filter_map(|oid| oid.parse::<u32>().ok())
            .map(|oid| slot(&self.database, oid))
            .collect();
        if slots.is_empty() {
            return Ok(None);
        }
        self.known
            .insert(table.to_string(), (slots.clone(), Instant::now()));
        Ok(Some(slots))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_lines_name_their_table() {
        assert_eq!(
            table_name(b"table public.t: INSERT: id[integer]:1").as_deref(),
            Some("public.t")
        );
        assert_eq!(
            table_name(b"table \"My: Schema\".\"T\": UPDATE: x").as_deref(),
            Some("\"My: Schema\".\"T\"")
        );
        assert_eq!(table_name(b"BEGIN"), None);
        assert_eq!(table_name(b"message: transactional: 1"), None);
    }

    #[test]
    fn status_updates_report_one_position() {
        let update = status_update(0x1_0000_0010);
        assert_eq!(update.len(), 34);
        assert_eq!(update[0], b'r');
        assert_eq!(&update[1..9], &0x1_0000_0010u64.to_be_bytes());
        assert_eq!(&update[17..25], &0x1_0000_0010u64.to_be_bytes());
    }

    #[test]
    fn slot_names_are_plain_identifiers() {
        let name = slot_name("my-db");
        assert!(name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
    }
}
