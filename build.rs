//! Compiles `proto/` with protox (pure Rust, so no system protoc) and writes the descriptor set that
//! gRPC server reflection serves.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/tollgate/v1/tollgate.proto",
    "proto/envoy/service/ratelimit/v3/rls.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out = PathBuf::from(env::var("OUT_DIR")?);

    let fds = protox::compile(PROTOS, ["proto"])?;
    std::fs::write(
        out.join("tollgate_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
