//! The pure core: limits, amounts, bucket math, the batch decision, identifiers and records. No
//! I/O, no clock, no async: every function here is deterministic in its arguments, so it is tested
//! exhaustively without a store.

pub mod amounts;
pub mod batch;
pub mod bucket;
pub mod calendar;
pub mod ids;
pub mod limit;
pub mod records;
pub mod schedule;
