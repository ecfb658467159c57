//! A server connection lent to one client by its pool. Whoever holds it decides its fate
//! in one of three ways — [`Lease::release`] (clean, reusable), [`Lease::discard`] (close
//! it politely), or dropping it (the connection is lost: the socket closes with it and the
//! pool's place frees) — so no call site can forget to give a place back or give it back
//! twice.

use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::rc::Rc;

use crate::backend::BackendConn;
use crate::pool::Pool;

pub struct Lease {
    /// Always `Some` until the lease ends.
    conn: Option<BackendConn>,
    pool: Rc<Pool>,
}

impl Lease {
    pub(crate) fn new(conn: BackendConn, pool: Rc<Pool>) -> Lease {
        pool.lent(conn.stream.as_raw_fd());
        Lease {
            conn: Some(conn),
            pool,
        }
    }

    /// Takes the connection out, no longer cuttable by a fence.
    fn take(&mut self) -> Option<BackendConn> {
        let conn = self.conn.take()?;
        self.pool.returned(conn.stream.as_raw_fd());
        Some(conn)
    }

    /// The pool the connection goes back to.
    pub fn pool(&self) -> &Rc<Pool> {
        &self.pool
    }

    /// Gives a clean connection (status I, nothing in flight, reset done) back for reuse.
    pub fn release(mut self) {
        if let Some(conn) = self.take() {
            self.pool.release(conn);
        }
    }

    /// Closes a connection that must not be reused (state unknown or tied to the client).
    pub fn discard(mut self) {
        if let Some(conn) = self.take() {
            self.pool.discard(conn);
        }
    }

    /// The connection broke: nothing to say goodbye to. Same as dropping the lease,
    /// spelled out where it is the intent.
    pub fn lost(self) {}
}

impl Deref for Lease {
    type Target = BackendConn;

    fn deref(&self) -> &BackendConn {
        self.conn
            .as_ref()
            .expect("a lease holds its connection until it ends")
    }
}

impl DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut BackendConn {
        self.conn
            .as_mut()
            .expect("a lease holds its connection until it ends")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(conn) = self.take() {
            drop(conn);
            self.pool.forget();
        }
    }
}
