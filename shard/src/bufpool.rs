//! Per-shard pool of I/O buffers. Sessions take buffers only while they move bytes and
//! give them back when they go idle, so an idle client costs no buffer memory.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::rc::Rc;

/// How many free buffers a shard keeps for reuse; the rest are freed.
const MAX_FREE: usize = 256;

#[derive(Clone)]
pub struct BufPool {
    inner: Rc<PoolInner>,
}

struct PoolInner {
    size: usize,
    free: RefCell<Vec<Box<[u8]>>>,
    /// The fewest free buffers seen since the last trim: that many sat unused all along.
    low_water: std::cell::Cell<usize>,
}

impl BufPool {
    pub fn new(size: usize) -> Self {
        BufPool {
            inner: Rc::new(PoolInner {
                size,
                free: RefCell::new(Vec::new()),
                low_water: std::cell::Cell::new(0),
            }),
        }
    }

    pub fn buffer_size(&self) -> usize {
        self.inner.size
    }

    pub fn take(&self) -> Buf {
        let mut free = self.inner.free.borrow_mut();
        let data = free
            .pop()
            .unwrap_or_else(|| vec![0u8; self.inner.size].into_boxed_slice());
        if free.len() < self.inner.low_water.get() {
            self.inner.low_water.set(free.len());
        }
        drop(free);
        Buf {
            data: Some(data),
            pool: self.inner.clone(),
        }
    }

    /// Frees the buffers that stayed unused since the last call, so a burst of activity
    /// does not leave its buffers parked forever while steady traffic keeps what it uses.
    pub fn trim(&self) {
        let mut free = self.inner.free.borrow_mut();
        let unused = self.inner.low_water.get().min(free.len());
        let keep = free.len() - unused;
        free.truncate(keep);
        free.shrink_to_fit();
        self.inner.low_water.set(free.len());
    }

    /// Buffers currently parked for reuse (for stats).
    pub fn free_count(&self) -> usize {
        self.inner.free.borrow().len()
    }
}

/// A buffer on loan from a [`BufPool`]; returns itself on drop.
pub struct Buf {
    data: Option<Box<[u8]>>,
    pool: Rc<PoolInner>,
}

impl Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.data.as_deref().unwrap_or(&[])
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.data.as_deref_mut().unwrap_or(&mut [])
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some(data) = self.data.take() {
            let mut free = self.pool.free.borrow_mut();
            if free.len() < MAX_FREE {
                free.push(data);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused() {
        let pool = BufPool::new(64);
        let mut a = pool.take();
        a[0] = 7;
        let ptr = a.as_ptr();
        drop(a);
        assert_eq!(pool.free_count(), 1);
        let b = pool.take();
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(b.len(), 64);
        assert_eq!(pool.free_count(), 0);
    }

    #[test]
    fn trim_frees_only_buffers_unused_for_a_whole_interval() {
        let pool = BufPool::new(64);
        let burst: Vec<Buf> = (0..10).map(|_| pool.take()).collect();
        drop(burst);
        assert_eq!(pool.free_count(), 10);
        pool.trim(); // low water was 0 during the burst: nothing is provably idle yet
        assert_eq!(pool.free_count(), 10);
        let steady: Vec<Buf> = (0..3).map(|_| pool.take()).collect();
        drop(steady);
        pool.trim(); // 7 were never touched in this interval
        assert_eq!(pool.free_count(), 3);
        pool.trim(); // and 3 sat unused in the next one
        assert_eq!(pool.free_count(), 0);
    }
}
