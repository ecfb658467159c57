//! Whole-message reads for the paths that are not hot (startup, authentication,
//! internal exchanges): a growable buffer, one owned body per message.

use std::io;

use futures_lite::AsyncReadExt;

use crate::codec::{frame, CodecError};

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Codec(#[from] CodecError),
}

/// Reads whole messages from a stream into a growable buffer. Used only off the hot path
/// (startup, internal exchanges, draining).
pub struct MessageReader {
    buf: Vec<u8>,
    start: usize,
    max: usize,
}

impl MessageReader {
    pub fn new(max: usize) -> Self {
        MessageReader {
            buf: Vec::with_capacity(1024),
            start: 0,
            max,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.buf.len()
    }

    pub async fn next<S: futures_lite::AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
    ) -> Result<(u8, Vec<u8>), ReadError> {
        loop {
            if let Some((tag, body, total)) =
                frame::split_message(&self.buf[self.start..], self.max)?
            {
                let body = body.to_vec();
                self.start += total;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                return Ok((tag, body));
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let old = self.buf.len();
            self.buf.resize(old + 8192, 0);
            let n = stream.read(&mut self.buf[old..]).await?;
            self.buf.truncate(old + n);
            if n == 0 {
                return Err(ReadError::Closed);
            }
        }
    }
}
