//! SQL text analysis for the pooler: a tokenizer that respects quoting and comments, and
//! the classification transaction pooling needs.

pub mod classify;
pub mod lexer;

pub use classify::{classify, deallocate_name, unlisted_setting_names, Effects, Pins};
