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
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    count: AtomicU64::new(0),
    bytes: AtomicU64::new(0),
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
    fn note(size: usize) {
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
        let slot = &SLOT_TABLE[slot];
        slot.count.fetch_add(1, Ordering::Relaxed);
        slot.bytes.fetch_add(size as u64, Ordering::Relaxed);
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
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

/// Allocations (and reallocations) since the start, and the bytes they asked for.
pub fn totals() -> (u64, u64) {
    SLOT_TABLE.iter().fold((0, 0), |(count, bytes), slot| {
        (
            count + slot.count.load(Ordering::Relaxed),
            bytes + slot.bytes.load(Ordering::Relaxed),
        )
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_this_threads_allocations() {
        let (before, bytes_before) = super::totals();
        let v: Vec<u8> = Vec::with_capacity(1000);
        std::hint::black_box(&v);
        let (after, bytes_after) = super::totals();
        assert!(after > before);
        assert!(bytes_after >= bytes_before + 1000);
    }
}
