//! Compiles the gRPC API with protox (pure Rust): the build needs no system `protoc`. Also writes
//! the encoded descriptor set, which the server's reflection service offers (so grpcurl works).

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/zae_limiter/v1/ratelimit.proto";
    let fds = protox::compile([proto], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("zae_limiter_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    println!("cargo:rerun-if-changed={proto}");
    Ok(())
}
