//! SQL text analysis for the pooler: a tokenizer that respects quoting and comments, and
//! the classification transaction pooling needs, and the analysis read/write routing needs.

pub mod classify;
pub mod exclusive;
pub mod lexer;
pub mod route;

pub use classify::{classify, deallocate_name, unlisted_setting_names, Effects, Pins};
pub use route::{analyze, ReadOnlyFunctions, RouteAnalysis, RouteHint, TableRef};
