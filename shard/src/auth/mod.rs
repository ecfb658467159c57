//! Password authentication, both as a server (clients log in to the proxy) and as a
//! client (the proxy logs in to backends): cleartext, md5 and SCRAM-SHA-256.

pub mod client;
pub mod credential;
pub mod hba;
pub mod md5;
pub mod scram;
pub mod secret;

pub use credential::ServerCredential;
pub use secret::Secret;
