//! Sans-IO PostgreSQL v3 wire codec: pure functions from bytes to messages and back,
//! shared by the data plane, the health checker and the tests.

pub mod backend;
pub mod error;
pub mod frame;
pub mod frontend;
pub mod startup;
pub mod tag;

pub use error::CodecError;
