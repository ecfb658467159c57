//! Counts heap allocations, so `/metrics` and the perf harness can show allocations per
//! query and the next hot-path regression is visible. The system allocator does the
//! work; each thread adds to its own cache-line-sized counter (no shared line is
//! written on the query path), and a reader sums them.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Counter blocks; threads beyond this many share blocks (still exact, just contended).
const SLOTS: usize = 64;

#[repr(align(64))]
struct Slot {
    count: AtomicU64,
    bytes: AtomicU64,
    /// Bytes given back (the heap in use is `bytes - freed`, summed over every block).
    freed: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    count: AtomicU64::new(0),
    bytes: AtomicU64::new(0),
    freed: AtomicU64::new(0),
};

static SLOT_TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's block, chosen on its first allocation.
    static MY_SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// The process's allocator: the system's, counted.
pub struct Counting;

impl Counting {
    #[inline]
    fn slot() -> &'static Slot {
        let slot = MY_SLOT
            .try_with(|mine| {
                let mut slot = mine.get();
                if slot == usize::MAX {
                    slot = NEXT_SLOT.fetch_add(1, Ordering::Relaxed) % SLOTS;
                    mine.set(slot);
                }
                slot
            })
            // A thread being torn down: any block will do.
            .unwrap_or(0);
        &SLOT_TABLE[slot]
    }

    #[inline]
    fn note(size: usize) {
        let slot = Self::slot();
        slot.count.fetch_add(1, Ordering::Relaxed);
        slot.bytes.fetch_add(size as u64, Ordering::Relaxed);
    }

    #[inline]
    fn note_free(size: usize) {
        Self::slot().freed.fetch_add(size as u64, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to `System`; counting touches no heap memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::note(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::note(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::note(new_size);
        Self::note_free(layout.size());
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        Self::note_free(layout.size());
        System.dealloc(ptr, layout)
    }
}

/// What the allocator has done since the start.
#[derive(Clone, Copy, Debug, Default)]
pub struct Totals {
    /// Allocations and reallocations.
    pub count: u64,
    /// Bytes they asked for.
    pub bytes: u64,
    /// Bytes allocated and not yet freed (the heap in use, allocator overhead aside).
    pub in_use: u64,
}

pub fn totals() -> Totals {
    let (count, bytes, freed) = SLOT_TABLE.iter().fold((0, 0, 0), |(c, b, f), slot| {
        (
            c + slot.count.load(Ordering::Relaxed),
            b + slot.bytes.load(Ordering::Relaxed),
            f + slot.freed.load(Ordering::Relaxed),
        )
    });
    Totals {
        count,
        bytes,
        // Blocks are read one after another: a free counted before its allocation is
        // must not wrap the figure.
        in_use: bytes.saturating_sub(freed),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_this_threads_allocations() {
        let before = super::totals();
        let v: Vec<u8> = Vec::with_capacity(100_000);
        std::hint::black_box(&v);
        let after = super::totals();
        assert!(after.count > before.count);
        assert!(after.bytes >= before.bytes + 100_000);
        drop(v);
        let freed = super::totals();
        assert!(
            freed.in_use + 50_000 < after.in_use,
            "{after:?} then {freed:?}"
        );
    }
}
