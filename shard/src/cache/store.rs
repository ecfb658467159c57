//! One tier's cached results on one shard: a quick_cache bounded by bytes, each entry
//! with the epochs it was read at and its expiry. Entries are shared (`Arc`) between
//! tiers and shards: a result stored in L1, L2 and L3 exists once.

use std::cell::{Cell, RefCell};
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use quick_cache::unsync::Cache;
use quick_cache::{Lifecycle, Weighter};

use super::Epochs;

/// One cached result.
#[derive(Debug)]
pub struct Entry {
    /// RowDescription, the DataRows and CommandComplete, as the server sent them.
    pub bytes: Box<[u8]>,
    /// Where the DataRows start (after the RowDescription).
    pub rows_at: usize,
    /// (slot, epoch) of every table the result read, when it was read.
    pub deps: Box<[(u32, u64)]>,
    /// The everything-epoch when it was read.
    pub global: u64,
    pub expires: Option<Instant>,
}

impl Entry {
    /// Still the answer the server would give: no table it read was written since, and
    /// its time is not up.
    pub fn fresh(&self, epochs: &Epochs, now: Instant) -> bool {
        self.global == epochs.global()
            && self.expires.is_none_or(|at| now < at)
            && self.deps.iter().all(|&(slot, at)| epochs.epoch(slot) == at)
    }

    /// Bytes an entry costs: its answer, its dependencies and bookkeeping.
    fn weight(&self) -> u64 {
        (self.bytes.len() + self.deps.len() * 16 + ENTRY_OVERHEAD) as u64
    }
}

/// The entry's fixed part, its key and the cache's own slot for it.
const ENTRY_OVERHEAD: usize = 128;

#[derive(Clone)]
struct Weigh;

impl Weighter<u128, Arc<Entry>> for Weigh {
    fn weight(&self, _key: &u128, entry: &Arc<Entry>) -> u64 {
        entry.weight()
    }
}

/// Counts entries pushed out by memory pressure.
#[derive(Clone, Default)]
struct Evictions(Rc<Cell<u64>>);

impl Lifecycle<u128, Arc<Entry>> for Evictions {
    type RequestState = ();

    fn begin_request(&self) -> Self::RequestState {}

    fn on_evict(&self, _state: &mut (), _key: u128, _entry: Arc<Entry>) {
        self.0.set(self.0.get() + 1);
    }
}

/// Keys are already 128-bit hashes: their low bits index the table as they are.
#[derive(Clone, Default)]
struct KeyHash;

impl BuildHasher for KeyHash {
    type Hasher = KeyHasher;

    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(0)
    }
}

#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(word);
        }
    }

    fn write_u128(&mut self, v: u128) {
        self.0 ^= (v as u64) ^ ((v >> 64) as u64);
    }
}

/// One shard's results of one tier.
pub struct Store {
    cache: RefCell<Cache<u128, Arc<Entry>, Weigh, KeyHash, Evictions>>,
    evictions: Rc<Cell<u64>>,
    /// Entries found stale and dropped.
    stale: Cell<u64>,
    /// The everything-epoch last seen: when it moves, every entry goes at once.
    seen_global: Cell<u64>,
}

impl Store {
    pub fn new(max_bytes: u64) -> Store {
        let evictions = Evictions::default();
        let counter = evictions.0.clone();
        let estimated_items = (max_bytes / 512).clamp(16, 1 << 20) as usize;
        Store {
            cache: RefCell::new(Cache::with(
                estimated_items,
                max_bytes.max(1),
                Weigh,
                KeyHash,
                evictions,
            )),
            evictions: counter,
            stale: Cell::new(0),
            seen_global: Cell::new(0),
        }
    }

    /// The fresh entry for `key`, if there is one (a stale one is dropped).
    pub fn fresh(&self, key: u128, epochs: &Epochs) -> Option<Arc<Entry>> {
        self.follow_global(epochs);
        let mut cache = self.cache.borrow_mut();
        let entry = cache.get(&key)?.clone();
        if entry.fresh(epochs, Instant::now()) {
            return Some(entry);
        }
        cache.remove(&key);
        self.stale.set(self.stale.get() + 1);
        None
    }

    pub fn insert(&self, key: u128, entry: Arc<Entry>) {
        if entry.global > self.seen_global.get() {
            // Everything before it was invalidated: make room now.
            self.seen_global.set(entry.global);
            self.cache.borrow_mut().clear();
        }
        self.cache.borrow_mut().insert(key, entry);
    }

    /// Drops every entry when everything was invalidated (the memory comes back now
    /// rather than entry by entry).
    fn follow_global(&self, epochs: &Epochs) {
        let global = epochs.global();
        if global != self.seen_global.get() {
            self.seen_global.set(global);
            self.cache.borrow_mut().clear();
        }
    }

    pub fn set_capacity(&self, max_bytes: u64) {
        self.cache.borrow_mut().set_capacity(max_bytes.max(1));
    }

    pub fn clear(&self) {
        self.cache.borrow_mut().clear();
    }

    pub fn entries(&self) -> u64 {
        self.cache.borrow().len() as u64
    }

    pub fn bytes(&self) -> u64 {
        self.cache.borrow().weight()
    }

    pub fn evictions(&self) -> u64 {
        self.evictions.get()
    }

    pub fn stale(&self) -> u64 {
        self.stale.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(size: usize, deps: &[(u32, u64)]) -> Arc<Entry> {
        Arc::new(Entry {
            bytes: vec![0u8; size].into(),
            rows_at: 0,
            deps: deps.into(),
            global: 0,
            expires: None,
        })
    }

    #[test]
    fn a_moved_epoch_makes_an_entry_stale() {
        let epochs = Epochs::default();
        let store = Store::new(1 << 20);
        store.insert(1, entry(10, &[(7, 0)]));
        assert!(store.fresh(1, &epochs).is_some());
        epochs.invalidate(&[7]);
        assert!(store.fresh(1, &epochs).is_none());
        assert_eq!((store.entries(), store.stale()), (0, 1));
    }

    #[test]
    fn everything_invalidated_empties_the_store() {
        let epochs = Epochs::default();
        let store = Store::new(1 << 20);
        store.insert(1, entry(10, &[]));
        store.insert(2, entry(10, &[]));
        epochs.invalidate_all();
        assert!(store.fresh(2, &epochs).is_none());
        assert_eq!(store.entries(), 0);
    }

    #[test]
    fn memory_stays_within_its_bound() {
        let epochs = Epochs::default();
        let store = Store::new(64 * 1024);
        for key in 0..1000u128 {
            store.insert(key, entry(1000, &[]));
        }
        assert!(store.bytes() <= 64 * 1024, "{}", store.bytes());
        assert!(store.evictions() > 0);
        let kept = (0..1000u128)
            .filter(|k| store.fresh(*k, &epochs).is_some())
            .count();
        assert!(kept > 0 && kept < 100, "{kept}");
    }
}
