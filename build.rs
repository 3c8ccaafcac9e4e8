//! Compiles the gRPC API with protox (pure Rust): the build needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/zae_limiter/v1/ratelimit.proto";
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    println!("cargo:rerun-if-changed={proto}");
    Ok(())
}
