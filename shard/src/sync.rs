//! Single-threaded synchronisation primitives for tasks on one shard: a one-shot slot
//! and a broadcast latch. No atomics, no allocation beyond the shared cell.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// A value handed from one task to another exactly once.
pub struct Slot<T> {
    value: RefCell<Option<T>>,
    waker: RefCell<Option<Waker>>,
    abandoned: Cell<bool>,
}

impl<T> Slot<T> {
    pub fn new() -> Rc<Self> {
        Rc::new(Slot {
            value: RefCell::new(None),
            waker: RefCell::new(None),
            abandoned: Cell::new(false),
        })
    }

    /// Delivers `value`, or gives it back when the receiver has gone away.
    pub fn put(&self, value: T) -> Result<(), T> {
        if self.abandoned.get() {
            return Err(value);
        }
        *self.value.borrow_mut() = Some(value);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
        Ok(())
    }

    pub fn is_abandoned(&self) -> bool {
        self.abandoned.get()
    }

    /// Marks the receiver gone and returns anything delivered in the meantime.
    pub fn abandon(&self) -> Option<T> {
        self.abandoned.set(true);
        self.value.borrow_mut().take()
    }

    pub fn wait(self: &Rc<Self>) -> SlotWait<'_, T> {
        SlotWait { slot: self }
    }
}

pub struct SlotWait<'a, T> {
    slot: &'a Rc<Slot<T>>,
}

impl<T> Future for SlotWait<'_, T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        if let Some(v) = self.slot.value.borrow_mut().take() {
            return Poll::Ready(v);
        }
        *self.slot.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A latch that many tasks wait on and that is set once (shutdown, drain). Waiters
/// occupy a slot only while they wait, so finished sessions leave nothing behind.
#[derive(Clone, Default)]
pub struct Latch {
    inner: Rc<LatchInner>,
}

#[derive(Default)]
struct LatchInner {
    set: Cell<bool>,
    slots: RefCell<Vec<Option<Waker>>>,
    free: RefCell<Vec<usize>>,
}

impl Latch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_set(&self) -> bool {
        self.inner.set.get()
    }

    pub fn set(&self) {
        self.inner.set.set(true);
        let wakers: Vec<Waker> = self
            .inner
            .slots
            .borrow_mut()
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for w in wakers {
            w.wake();
        }
    }

    pub fn wait(&self) -> LatchWait<'_> {
        LatchWait {
            latch: self,
            slot: None,
        }
    }
}

pub struct LatchWait<'a> {
    latch: &'a Latch,
    slot: Option<usize>,
}

impl Future for LatchWait<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.latch.is_set() {
            return Poll::Ready(());
        }
        let inner = &self.latch.inner;
        let waker = Some(cx.waker().clone());
        match self.slot {
            Some(i) => inner.slots.borrow_mut()[i] = waker,
            None => {
                let mut slots = inner.slots.borrow_mut();
                let i = match inner.free.borrow_mut().pop() {
                    Some(i) => {
                        slots[i] = waker;
                        i
                    }
                    None => {
                        slots.push(waker);
                        slots.len() - 1
                    }
                };
                drop(slots);
                self.slot = Some(i);
            }
        }
        Poll::Pending
    }
}

impl Drop for LatchWait<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.slot.take() {
            self.latch.inner.slots.borrow_mut()[i] = None;
            self.latch.inner.free.borrow_mut().push(i);
        }
    }
}

/// A notification that can fire many times: each `notify` wakes everyone waiting at that
/// moment (a fresh latch per round).
#[derive(Default)]
pub struct Signal {
    current: RefCell<Latch>,
}

impl Signal {
    /// Wakes every current waiter.
    pub fn notify(&self) {
        let fired = std::mem::take(&mut *self.current.borrow_mut());
        fired.set();
    }

    /// Resolves at the next `notify`.
    pub async fn wait(&self) {
        let latch = self.current.borrow().clone();
        latch.wait().await;
    }
}

/// Open by default; while closed (PAUSE) waiters queue until it opens again.
#[derive(Default)]
pub struct Gate {
    closed: Cell<bool>,
    opened: Signal,
}

impl Gate {
    pub fn is_closed(&self) -> bool {
        self.closed.get()
    }

    pub fn set_closed(&self, closed: bool) {
        if self.closed.replace(closed) && !closed {
            self.opened.notify();
        }
    }

    pub async fn wait_open(&self) {
        while self.closed.get() {
            self.opened.wait().await;
        }
    }
}

/// Runs `fut` for at most `dur`; `None` when time ran out.
pub async fn timeout<F: Future>(dur: std::time::Duration, fut: F) -> Option<F::Output> {
    futures_lite::future::or(async { Some(fut.await) }, async {
        glommio::timer::sleep(dur).await;
        None
    })
    .await
}
