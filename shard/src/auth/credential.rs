//! What the proxy logs in to a backend with, as one role: a configured password, or —
//! with no password in the configuration — what the client's own login proved (SCRAM
//! pass-through's ClientKey, the md5 hash the server stores, or a clear-text password
//! the client sent).

use std::fmt;

use super::scram::ScramKeys;

#[derive(Clone, PartialEq, Eq)]
pub enum ServerCredential {
    Password(String),
    /// Keys recovered from a client's SCRAM proof; they answer SCRAM only.
    Scram(ScramKeys),
    /// "md5" + 32 hex digits, as in `pg_authid`; it answers md5 challenges only.
    Md5Hash(String),
}

impl ServerCredential {
    /// The password, when this credential is one.
    pub fn password(&self) -> Option<&str> {
        match self {
            ServerCredential::Password(password) => Some(password),
            _ => None,
        }
    }

    /// Names the kind, for errors that say why a server's request cannot be answered.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerCredential::Password(_) => "a password",
            ServerCredential::Scram(_) => "the client's SCRAM keys",
            ServerCredential::Md5Hash(_) => "the role's md5 hash",
        }
    }
}

/// Secrets stay out of logs.
impl fmt::Debug for ServerCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerCredential::Password(_) => f.write_str("Password(<redacted>)"),
            ServerCredential::Scram(keys) => write!(f, "{keys:?}"),
            ServerCredential::Md5Hash(_) => f.write_str("Md5Hash(<redacted>)"),
        }
    }
}
