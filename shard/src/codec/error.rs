//! The one error type of the codec. Every variant is a protocol violation by the peer, so
//! the caller's only sensible reaction is to report it (with [`CodecError::sqlstate`]) and
//! close the connection.

use std::fmt;

/// Why a byte sequence is not a valid PostgreSQL v3 message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// A length field below its minimum (4 for tagged messages, 8 for startup packets).
    #[error("invalid message length {len}")]
    InvalidLength { len: i64 },
    /// A message larger than the configured limit; `len` counts every byte of the message.
    #[error("message of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    /// A tag byte that is not valid in this direction of the stream.
    #[error("unknown message type {}", DisplayTag(*.0))]
    UnknownTag(u8),
    /// A message whose body does not match its documented layout.
    #[error("malformed {what} message: {problem}")]
    Malformed {
        what: &'static str,
        problem: &'static str,
    },
    /// A startup packet asking for a protocol this proxy does not speak.
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
}

impl CodecError {
    /// The SQLSTATE to put in the ErrorResponse sent before closing the connection.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            CodecError::UnsupportedProtocol { .. } => "0A000",
            _ => "08P01",
        }
    }

    /// Shorthand for the most common variant, used by every decoder.
    pub(crate) const fn malformed(what: &'static str, problem: &'static str) -> CodecError {
        CodecError::Malformed { what, problem }
    }
}

/// Shows a tag as `'X'` when printable and as `0xNN` otherwise, so a garbage byte cannot
/// inject control characters into logs or client-visible messages.
struct DisplayTag(u8);

impl fmt::Display for DisplayTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}'", char::from(self.0))
        } else {
            write!(f, "0x{:02X}", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_match_the_contract() {
        assert_eq!(
            CodecError::InvalidLength { len: -3 }.to_string(),
            "invalid message length -3"
        );
        assert_eq!(
            CodecError::TooLarge { len: 70, max: 64 }.to_string(),
            "message of 70 bytes exceeds the maximum of 64"
        );
        assert_eq!(
            CodecError::malformed("Bind", "truncated").to_string(),
            "malformed Bind message: truncated"
        );
        assert_eq!(
            CodecError::UnsupportedProtocol { major: 2, minor: 0 }.to_string(),
            "unsupported frontend protocol 2.0: server supports 3.0 to 3.0"
        );
    }

    #[test]
    fn unknown_tag_is_printed_safely() {
        assert_eq!(
            CodecError::UnknownTag(b'x').to_string(),
            "unknown message type 'x'"
        );
        assert_eq!(
            CodecError::UnknownTag(0).to_string(),
            "unknown message type 0x00"
        );
        assert_eq!(
            CodecError::UnknownTag(b' ').to_string(),
            "unknown message type 0x20"
        );
        assert_eq!(
            CodecError::UnknownTag(0xFF).to_string(),
            "unknown message type 0xFF"
        );
    }

    #[test]
    fn sqlstates() {
        assert_eq!(
            CodecError::UnsupportedProtocol { major: 4, minor: 0 }.sqlstate(),
            "0A000"
        );
        assert_eq!(CodecError::UnknownTag(b'?').sqlstate(), "08P01");
        assert_eq!(CodecError::InvalidLength { len: 0 }.sqlstate(), "08P01");
        assert_eq!(CodecError::TooLarge { len: 9, max: 8 }.sqlstate(), "08P01");
        assert_eq!(CodecError::malformed("x", "y").sqlstate(), "08P01");
    }
}
