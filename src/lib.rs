//! zae-limiter: a node-local rate-limit daemon for LLM and API traffic, with DynamoDB as the
//! authoritative store.
//!
//! Layout and invariants:
//! - [`domain`]: pure, deterministic token-bucket math, limits, ids and records. No I/O, no clock.
//! - [`store`]: one storage trait ([`store::Store`]) with an embedded in-memory implementation and
//!   a DynamoDB one; both pass the same conformance suite (`tests/conformance.rs`).
//! - [`limiter`]: the daemon's core: one actor per consistency group deciding batches with
//!   [`domain::batch::decide_batch`], settling leases, compensating what callers were not told.
//! - [`admin`]: entity, limit, namespace, audit and usage rules; [`grpc`] only converts.
//! - [`consume`]: one acquire without a daemon (tools, tests): plan, write conditionally, re-plan
//!   on conflict from the returned item.
//! - [`clock`]: the only place that reads the wall clock.
//!
//! Money and safety rules that every change must keep: one bucket item per (namespace, entity,
//! resource) holds all its limits (one write per decision); bucket items are in no index; every
//! write to a bucket is conditional on what it was planned from, so any number of daemons sharing
//! a table never admit more than the limits allow; an acknowledged admit is durable, and a caller
//! told "not admitted" is not charged once compensations settle; every sum of caller-supplied
//! amounts is checked, and every stored item stays readable (docs/daemon.md, "The ledger at the
//! edges").

#![forbid(unsafe_code)]
#![warn(missing_debug_implementations, rust_2018_idioms)]

pub mod access;
pub mod admin;
pub mod authority;
#[cfg(feature = "client")]
pub mod cli;
#[cfg(feature = "client")]
pub mod client;
pub mod clock;
pub mod config;
pub mod consume;
pub mod domain;
pub mod envoy;
pub mod grpc;
pub mod limiter;
pub mod live;
pub mod metrics;
pub mod ops;
pub mod proto;
pub mod server;
pub mod store;
pub mod telemetry;

pub use domain::bucket::{Bucket, LimitStatus, Rejection};
pub use domain::ids::{BucketKey, EntityId, Namespace, ResourceId};
pub use domain::limit::{Limit, LimitError, LimitName};
pub use domain::records::{Entity, FailurePolicy, Gate, LimitScope};
pub use store::{Store, StoreError};

/// The README's Rust examples, compiled as doc tests so they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
