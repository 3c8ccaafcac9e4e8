//! Generated gRPC types and services of `proto/zae_limiter/v1/ratelimit.proto`.
#![allow(missing_debug_implementations, clippy::all, clippy::pedantic)]

tonic::include_proto!("zae_limiter.v1");
