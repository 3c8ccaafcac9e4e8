//! Generated gRPC types and services of `proto/zae_limiter/v1/ratelimit.proto`.
#![allow(missing_debug_implementations, clippy::all, clippy::pedantic)]

tonic::include_proto!("zae_limiter.v1");

/// The encoded descriptor set of the API, for gRPC server reflection.
pub const DESCRIPTOR: &[u8] = tonic::include_file_descriptor_set!("zae_limiter_descriptor");
