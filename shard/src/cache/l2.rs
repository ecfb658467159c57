//! L2: every result has an owning shard, named by its key, which keeps it in its part of
//! L2. A shard that misses in its own L1 asks the owner over the shard bus and waits a
//! little for the answer; a shard that stores a result hands a copy (a shared pointer)
//! to the owner.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use slab::Slab;

use super::store::Entry;

/// How long a lookup waits for the owner's answer before going to the server: the owner
/// may be busy, and a miss must not cost more than a round trip to PostgreSQL would.
pub const ANSWER_WAIT: Duration = Duration::from_millis(2);

/// The shard that owns `key` among `workers`.
pub fn owner(key: u128, workers: usize) -> usize {
    ((key >> 64) as u64 % workers.max(1) as u64) as usize
}

/// Lookups this shard is waiting on.
#[derive(Default)]
pub struct Waiting {
    slots: RefCell<Slab<Slot>>,
    generation: std::cell::Cell<u32>,
}

struct Slot {
    generation: u32,
    answer: Option<Option<Arc<Entry>>>,
    waker: Option<Waker>,
}

/// Names one waiting lookup (slot and generation, so a late answer for a slot reused
/// since finds nobody).
pub type Ticket = u64;

impl Waiting {
    /// A new waiting lookup.
    pub fn register(&self) -> Ticket {
        let generation = self.generation.get().wrapping_add(1);
        self.generation.set(generation);
        let slot = self.slots.borrow_mut().insert(Slot {
            generation,
            answer: None,
            waker: None,
        });
        ((generation as u64) << 32) | slot as u64
    }

    /// The owner answered.
    pub fn answer(&self, ticket: Ticket, entry: Option<Arc<Entry>>) {
        let mut slots = self.slots.borrow_mut();
        let Some(slot) = slots.get_mut((ticket & 0xffff_ffff) as usize) else {
            return;
        };
        if slot.generation != (ticket >> 32) as u32 {
            return;
        }
        slot.answer = Some(entry);
        if let Some(waker) = slot.waker.take() {
            waker.wake();
        }
    }

    /// Waits for the answer to `ticket` (dropping the future gives up on it).
    pub fn wait(&self, ticket: Ticket) -> Answer<'_> {
        Answer {
            waiting: self,
            ticket,
        }
    }

    fn forget(&self, ticket: Ticket) {
        let mut slots = self.slots.borrow_mut();
        let key = (ticket & 0xffff_ffff) as usize;
        if slots
            .get(key)
            .is_some_and(|s| s.generation == (ticket >> 32) as u32)
        {
            slots.remove(key);
        }
    }
}

/// The owner's answer: the fresh entry, or none.
pub struct Answer<'a> {
    waiting: &'a Waiting,
    ticket: Ticket,
}

impl Future for Answer<'_> {
    type Output = Option<Arc<Entry>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut slots = self.waiting.slots.borrow_mut();
        let Some(slot) = slots.get_mut((self.ticket & 0xffff_ffff) as usize) else {
            return Poll::Ready(None);
        };
        match slot.answer.take() {
            Some(answer) => Poll::Ready(answer),
            None => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for Answer<'_> {
    fn drop(&mut self) {
        self.waiting.forget(self.ticket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_spread_over_the_shards() {
        let mut seen = [0usize; 4];
        for i in 0..1000u128 {
            seen[owner(i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835), 4)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 150), "{seen:?}");
        assert_eq!(owner(12345, 1), 0);
    }

    #[test]
    fn a_late_answer_finds_nobody() {
        let waiting = Waiting::default();
        let first = waiting.register();
        waiting.forget(first);
        let second = waiting.register();
        assert_eq!(first & 0xffff_ffff, second & 0xffff_ffff);
        waiting.answer(first, None);
        assert!(waiting.slots.borrow()[(second & 0xffff_ffff) as usize]
            .answer
            .is_none());
        waiting.answer(second, None);
        assert!(waiting.slots.borrow()[(second & 0xffff_ffff) as usize]
            .answer
            .is_some());
    }
}
