//! The pure core: limits, bucket math, identifiers and records. No I/O, no clock, no async: every
//! function here is deterministic in its arguments, so it is tested exhaustively without a store.

pub mod bucket;
pub mod ids;
pub mod limit;
pub mod records;
