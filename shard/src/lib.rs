//! HeliosProxy data plane: everything that runs on a shard (one glommio executor per
//! core) plus the types the control plane shares with it (config, codec, auth).

pub mod auth;
pub mod backend;
pub mod budget;
pub mod bufpool;
pub mod bus;
pub mod cache;
pub mod cancel;
pub mod codec;
pub mod config;
pub mod context;
pub mod control;
pub mod dormant;
pub mod engine;
pub mod fence;
pub mod lease;
pub mod mailbox;
pub mod msgio;
pub mod nodeaddr;
pub mod pool;
pub mod prepared;
pub mod readiness;
pub mod router;
pub mod runtime;
pub mod session;
pub mod sql;
pub mod stats;
pub mod stream;
pub mod sync;
pub mod tls;
pub mod topology;
