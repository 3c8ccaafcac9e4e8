//! The `zae-limiter` command: the arguments are parsed here and run by the library
//! ([`zae_limiter::cli`]).

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    zae_limiter::cli::main(zae_limiter::cli::Cli::parse())
}
