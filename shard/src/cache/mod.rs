//! The query result cache.
//!
//! Results of read-only statements are kept per shard ([`store`]) under a key that
//! covers everything that changes their bytes ([`key`]). What a statement reads is
//! learned from the server's catalog once per statement shape ([`resolve`]): the tables
//! behind it (views expanded, inheritance and partition trees folded to their roots),
//! and whether every function it calls is immutable.
//!
//! Freshness rests on epochs ([`Epochs`]): one counter per table slot, shared by every
//! shard. A reader notes the epochs of its tables before its statement goes to the
//! server and keeps the result only if none moved by the time the answer is complete; a
//! writer moves the epochs of the tables it touched before the client sees its
//! statement's (or its COMMIT's) completion. A result stored before a write is found
//! stale on lookup; a result read before a write but stored after it is never stored.

pub mod key;
pub mod l2;
pub mod normalize;
pub mod resolve;
pub mod shard;
pub mod store;
pub mod writes;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Mutex;

/// Table slots. Two tables that share a slot only invalidate each other's results
/// more often than needed.
const SLOTS: usize = 1 << 14;

/// The epochs every shard reads and moves, and the table names the admin API can
/// invalidate by.
pub struct Epochs {
    slots: Box<[AtomicU64]>,
    /// When each slot last moved (milliseconds since `started`), for reads on replicas.
    moved_at: Box<[AtomicU64]>,
    global_moved_at: AtomicU64,
    /// The primary's WAL insert position as last read (`primary_lsn`), and when the read
    /// began (`primary_read_at`: milliseconds since `started`, plus one; 0: never read).
    primary_lsn: AtomicU64,
    primary_read_at: AtomicU64,
    started: std::time::Instant,
    /// Moves when everything is invalidated (a write whose reach is unknown, DDL,
    /// `POST /cache/invalidate {"all": true}`).
    global: AtomicU64,
    /// Moves on DDL: what statements read must be learned again.
    catalog: AtomicU64,
    /// `schema.table` → slots, for tables some shard has resolved.
    names: Mutex<HashMap<String, Vec<u32>>>,
    /// Invalidations made (table slots moved, or everything at once).
    invalidations: AtomicU64,
    /// The databases whose results the shards want to keep, and their WAL followers.
    wal: Mutex<Vec<(String, std::sync::Arc<WalFollow>)>>,
}

impl Default for Epochs {
    fn default() -> Self {
        Epochs {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            moved_at: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            global_moved_at: AtomicU64::new(0),
            primary_lsn: AtomicU64::new(0),
            primary_read_at: AtomicU64::new(0),
            started: std::time::Instant::now(),
            global: AtomicU64::new(0),
            catalog: AtomicU64::new(0),
            names: Mutex::default(),
            invalidations: AtomicU64::new(0),
            wal: Mutex::default(),
        }
    }
}

/// One database's WAL follower (`invalidation = "wal"`), as the shards and the admin
/// API see it.
#[derive(Default, Debug)]
pub struct WalFollow {
    /// Streaming, with everything cached before the stream began invalidated: results
    /// read from this database may be stored.
    pub ready: std::sync::atomic::AtomicBool,
    /// WAL the server has sent word of that the follower has not applied yet (bytes).
    pub lag_bytes: AtomicU64,
    /// From the server's sending a commit to its invalidation applied (microseconds,
    /// the last commit's).
    pub lag_micros: AtomicU64,
    /// The last WAL position applied.
    pub applied_lsn: AtomicU64,
    /// Committed transactions whose invalidations were applied.
    pub commits: AtomicU64,
    /// The replication slot (temporary: the server drops it when the stream ends).
    pub slot: Mutex<String>,
    pub last_error: Mutex<Option<String>>,
}

/// A table's slot: its database and (root) relation id.
pub fn slot(database: &str, oid: u32) -> u32 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(database.as_bytes());
    h.update(&oid.to_le_bytes());
    (h.digest() as usize % SLOTS) as u32
}

impl Epochs {
    pub fn epoch(&self, slot: u32) -> u64 {
        self.slots[slot as usize].load(SeqCst)
    }

    pub fn global(&self) -> u64 {
        self.global.load(SeqCst)
    }

    pub fn catalog(&self) -> u64 {
        self.catalog.load(SeqCst)
    }

    /// Results that read these slots are stale from now on.
    pub fn invalidate(&self, slots: &[u32]) {
        let now = self.now_ms();
        for &slot in slots {
            // When before the epoch: whoever sees the new epoch sees when it moved.
            self.moved_at[slot as usize].store(now, SeqCst);
            self.slots[slot as usize].fetch_add(1, SeqCst);
        }
        self.invalidations.fetch_add(1, SeqCst);
    }

    /// Every result is stale from now on.
    pub fn invalidate_all(&self) {
        self.global_moved_at.store(self.now_ms(), SeqCst);
        self.global.fetch_add(1, SeqCst);
        self.invalidations.fetch_add(1, SeqCst);
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The primary's WAL insert position `lsn`, read by a query sent at `asked`.
    pub fn observe_primary(&self, asked: std::time::Instant, lsn: u64) {
        let at = asked.saturating_duration_since(self.started).as_millis() as u64;
        // The position first: whoever sees the new time sees the new position.
        self.primary_lsn.store(lsn, SeqCst);
        self.primary_read_at.store(at + 1, SeqCst);
    }

    /// Whether a replica that has replayed up to `replayed` holds every write that moved
    /// `slots` so far: each moved (after its commit) before the primary's position was
    /// last read, and the replica has replayed past that position.
    pub fn replica_has_writes(&self, slots: &[u32], replayed: u64) -> bool {
        let read_at = self.primary_read_at.load(SeqCst);
        if read_at == 0 {
            return false;
        }
        let read_at = read_at - 1;
        replayed >= self.primary_lsn.load(SeqCst)
            && self.global_moved_at.load(SeqCst) < read_at
            && slots
                .iter()
                .all(|&slot| self.moved_at[slot as usize].load(SeqCst) < read_at)
    }

    /// After DDL: every result is stale, and what statements read is learned again.
    pub fn catalog_changed(&self) {
        self.catalog.fetch_add(1, SeqCst);
        self.invalidate_all();
    }

    pub fn invalidations(&self) -> u64 {
        self.invalidations.load(SeqCst)
    }

    /// The WAL follower of `database` (asked for on first use: the control plane starts
    /// one for every database asked for).
    pub fn wal_follow(&self, database: &str) -> std::sync::Arc<WalFollow> {
        let mut wal = self.wal.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, follow)) = wal.iter().find(|(db, _)| db == database) {
            return follow.clone();
        }
        let follow = std::sync::Arc::new(WalFollow::default());
        wal.push((database.to_string(), follow.clone()));
        follow
    }

    /// Every database asked for, with its follower.
    pub fn wal_follows(&self) -> Vec<(String, std::sync::Arc<WalFollow>)> {
        self.wal.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Remembers which slots `schema.table` names, for invalidation by name.
    pub fn learn_names(&self, names: &[(String, u32)]) {
        let mut known = self.names.lock().unwrap_or_else(|e| e.into_inner());
        for (name, slot) in names {
            let slots = known.entry(name.clone()).or_default();
            if !slots.contains(slot) {
                slots.push(*slot);
            }
        }
    }

    /// Invalidates results that read the table `name` (`schema.table`, or `table` in
    /// any schema). Returns how many known tables matched; 0 means no cached result
    /// could have read it.
    pub fn invalidate_table(&self, name: &str) -> usize {
        let slots: Vec<u32> = {
            let known = self.names.lock().unwrap_or_else(|e| e.into_inner());
            known
                .iter()
                .filter(|(known, _)| table_name_matches(name, known))
                .flat_map(|(_, slots)| slots.iter().copied())
                .collect()
        };
        let matched = slots.len();
        if matched > 0 {
            self.invalidate(&slots);
        }
        matched
    }
}

/// Whether a configured or requested table name (`schema.table` or `table`) names the
/// resolved `schema.table`.
pub fn table_name_matches(wanted: &str, qualified: &str) -> bool {
    if wanted.contains('.') {
        wanted == qualified
    } else {
        qualified
            .split_once('.')
            .is_some_and(|(_, table)| table == wanted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_match_with_or_without_schema() {
        assert!(table_name_matches("public.t", "public.t"));
        assert!(table_name_matches("t", "public.t"));
        assert!(table_name_matches("t", "other.t"));
        assert!(!table_name_matches("public.t", "other.t"));
        assert!(!table_name_matches("t", "public.tt"));
    }

    #[test]
    fn invalidating_a_name_moves_only_its_slots() {
        let epochs = Epochs::default();
        let (a, b) = (slot("db", 100), slot("db", 200));
        assert_ne!(a, b);
        epochs.learn_names(&[("public.a".into(), a), ("public.b".into(), b)]);
        assert_eq!(epochs.invalidate_table("a"), 1);
        assert_eq!(epochs.epoch(a), 1);
        assert_eq!(epochs.epoch(b), 0);
        assert_eq!(epochs.invalidate_table("public.missing"), 0);
        assert_eq!(epochs.invalidations(), 1);
        epochs.catalog_changed();
        assert_eq!((epochs.global(), epochs.catalog()), (1, 1));
    }

    #[test]
    fn a_replica_holds_writes_moved_before_the_primary_was_read() {
        let epochs = Epochs::default();
        let (a, b) = (slot("db", 1), slot("db", 2));
        assert!(!epochs.replica_has_writes(&[a], u64::MAX), "no reading yet");
        std::thread::sleep(std::time::Duration::from_millis(3));
        epochs.invalidate(&[a]);
        std::thread::sleep(std::time::Duration::from_millis(3));
        epochs.observe_primary(std::time::Instant::now(), 1000);
        assert!(epochs.replica_has_writes(&[a, b], 1000));
        assert!(
            !epochs.replica_has_writes(&[a], 999),
            "not replayed that far"
        );
        std::thread::sleep(std::time::Duration::from_millis(3));
        epochs.invalidate(&[b]);
        assert!(
            !epochs.replica_has_writes(&[b], 5000),
            "written after the reading"
        );
        assert!(epochs.replica_has_writes(&[a], 5000));
    }
}
